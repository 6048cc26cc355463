"""What a prefill worker does differently: one-token requests that leave a KV handle."""

from __future__ import annotations

import time
from typing import Any

from pdserve.errors import KvTransferError
from pdserve.kv_transfer.base import KvHandle, KvTransport
from pdserve.kv_transfer.metadata import KvLayout
from pdserve.v1 import common_pb2 as cpb
from pdserve.worker.sampling import to_vllm


class PrefillStage:
    def __init__(self, transport: KvTransport, layout: KvLayout) -> None:
        self.transport = transport
        self.layout = layout

    def sampling_params(self, msg: cpb.SamplingParams) -> Any:
        # One token is the cheapest way to make vLLM compute (and keep) the whole prompt.
        return to_vllm(
            msg, max_tokens=1, kv_transfer_params=self.transport.prefill_request_params()
        )

    def handle(self, kv_transfer_params: dict[str, Any] | None, num_prompt_tokens: int) -> KvHandle:
        if not kv_transfer_params:
            raise KvTransferError(
                "the prefill engine finished without KV transfer parameters "
                "(is its KV connector configured?)"
            )
        return self.transport.handle_from_prefill(
            kv_transfer_params, self.layout, num_prompt_tokens, now_ms=int(time.time() * 1000)
        )
