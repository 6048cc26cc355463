"""What a decode worker does differently: check the KV handle, then pull the KV."""

from __future__ import annotations

import time
from typing import Any

from pdserve.errors import InvalidRequestError, KvIncompatibleError, KvTransferError
from pdserve.kv_transfer.base import CONSUMER_GRACE_S, KvTransport
from pdserve.kv_transfer.metadata import KvLayout
from pdserve.kv_transfer.wire import handle_from_proto
from pdserve.v1 import common_pb2 as cpb
from pdserve.v1 import worker_pb2 as pb
from pdserve.worker.sampling import to_vllm


class DecodeStage:
    def __init__(self, transport: KvTransport, layout: KvLayout) -> None:
        self.transport = transport
        self.layout = layout

    def sampling_params(
        self, msg: cpb.SamplingParams, handle_msg: pb.KvHandle, num_prompt_tokens: int
    ) -> Any:
        """Validate the handle against this worker before any KV moves."""
        handle = handle_from_proto(handle_msg)
        if handle.transport != self.transport.name:
            raise KvIncompatibleError(
                f"KV handle uses transport {handle.transport!r}, "
                f"this decode worker uses {self.transport.name!r}"
            )
        self.layout.check_compatible(handle.layout, handle.format_version, transport_reshapes=True)
        self.transport.check_shapes(handle.layout, self.layout)
        if handle.num_prompt_tokens != num_prompt_tokens:
            raise InvalidRequestError(
                f"KV handle covers {handle.num_prompt_tokens} prompt tokens, "
                f"the request has {num_prompt_tokens}"
            )
        if handle.lease_deadline_unix_ms < time.time() * 1000:
            raise KvTransferError("the KV lease expired before the decode worker could pull it")
        return to_vllm(msg, kv_transfer_params=self.transport.decode_request_params(handle))

    @staticmethod
    def kv_wait_s(handle_msg: pb.KvHandle) -> float:
        """Seconds this request may wait for its first output (its KV): the lease plus grace."""
        left_s = handle_msg.lease_deadline_unix_ms / 1000 - time.time()
        return max(left_s, 0.0) + CONSUMER_GRACE_S
