"""KV transfer through vLLM's NixlConnector (pull mode; RDMA on GPUs, UCX on CPUs).

The decode engine reads the prefill engine's blocks directly, after a handshake over
NIXL's side channel (``VLLM_NIXL_SIDE_CHANNEL_PORT``, one per engine). vLLM maps KV heads
between different TP sizes itself. Pull mode cannot read from a pipeline-parallel
prefill engine (vLLM's handshake requires equal layer counts per rank), so that shape is
refused up front; PP on the decode side works.
"""

from __future__ import annotations

import json
from typing import Any

from pdserve.config import Role
from pdserve.errors import KvIncompatibleError, KvTransferError
from pdserve.kv_transfer.base import (
    CONSUMER_GRACE_S,
    PRODUCER_HOLD_MARGIN_S,
    KvHandle,
    KvTransport,
)
from pdserve.kv_transfer.metadata import KvLayout

_MODELLED = {
    "remote_engine_id",
    "remote_block_ids",
    "remote_host",
    "remote_port",
    "remote_request_id",
    "do_remote_prefill",
    "do_remote_decode",
}


class NixlTransport(KvTransport):
    name = "nixl"

    def engine_kv_config(self, role: Role, worker_id: str) -> dict[str, Any]:
        # kv_both lets one engine serve either side; the request's params pick the side.
        return {
            "kv_connector": "NixlConnector",
            "kv_role": "kv_both",
            "kv_buffer_device": "cpu",
            "engine_id": worker_id,
            "kv_load_failure_policy": "fail",
            "kv_connector_extra_config": {"kv_lease_duration": self.hold_s()},
        }

    def hold_s(self) -> int:
        """Seconds the prefill engine keeps read-pending blocks (vLLM's lease): past the
        advertised lease and the decode side's wait, since a NIXL read cannot be refused."""
        return max(1, int(self.lease_s + CONSUMER_GRACE_S + PRODUCER_HOLD_MARGIN_S))

    def prefill_request_params(self) -> dict[str, Any]:
        return {
            "do_remote_decode": True,
            "do_remote_prefill": False,
            "remote_engine_id": None,
            "remote_block_ids": None,
            "remote_host": None,
            "remote_port": None,
        }

    def handle_from_prefill(
        self, params: dict[str, Any], layout: KvLayout, num_prompt_tokens: int, now_ms: int
    ) -> KvHandle:
        try:
            block_ids = _flatten_block_ids(params["remote_block_ids"])
            return KvHandle(
                transport=self.name,
                layout=layout,
                engine_id=str(params["remote_engine_id"]),
                block_ids=block_ids,
                host=str(params["remote_host"]),
                port=int(params["remote_port"]),
                remote_request_id=str(params["remote_request_id"]),
                lease_deadline_unix_ms=now_ms + int(self.lease_s * 1000),
                num_prompt_tokens=num_prompt_tokens,
                extra={k: json.dumps(v) for k, v in params.items() if k not in _MODELLED},
            )
        except (KeyError, TypeError, ValueError) as e:
            raise KvTransferError(f"prefill engine returned unusable KV parameters: {e}") from e

    def decode_request_params(self, handle: KvHandle) -> dict[str, Any]:
        params: dict[str, Any] = {k: json.loads(v) for k, v in handle.extra.items()}
        params.update(
            do_remote_prefill=True,
            do_remote_decode=False,
            remote_engine_id=handle.engine_id,
            # vLLM expects one block-id list per KV-cache group (one group here).
            remote_block_ids=[list(handle.block_ids)],
            remote_host=handle.host,
            remote_port=handle.port,
            remote_request_id=handle.remote_request_id,
        )
        return params

    def check_shapes(self, producer: KvLayout, consumer: KvLayout) -> None:
        if producer.pipeline_parallel_size > 1:
            raise KvIncompatibleError(
                "the nixl transport (pull mode) cannot read KV from a pipeline-parallel "
                f"prefill engine (PP={producer.pipeline_parallel_size}); use PP=1 for the "
                "prefill pool"
            )


def _flatten_block_ids(raw: Any) -> tuple[int, ...]:
    """vLLM returns block ids per KV-cache group; a plain decoder has a single group."""
    if raw and isinstance(raw[0], list | tuple):
        if len(raw) != 1:
            raise ValueError(f"expected one KV-cache group, got {len(raw)}")
        raw = raw[0]
    return tuple(int(b) for b in raw)
