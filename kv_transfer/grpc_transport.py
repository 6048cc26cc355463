"""KV transfer over gRPC through pdserve's own vLLM connector (kv_transfer/vllm_connector.py).

The prefill engine stages a finished prompt's blocks in its engine ranks and serves them
on ``kv_port + rank``; the decode engine's ranks fetch the layers and heads they hold,
so every TP/PP shape pair is one mechanism (no shape is refused up front).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from pdserve.config import Role, TlsConfig
from pdserve.errors import KvTransferError
from pdserve.kv_transfer.base import KvHandle, KvTransport
from pdserve.kv_transfer.chunks import DEFAULT_CHUNK_BYTES
from pdserve.kv_transfer.metadata import KvLayout

CONNECTOR_MODULE = "pdserve.kv_transfer.vllm_connector"
CONNECTOR_CLASS = "GrpcKvConnector"


class GrpcTransport(KvTransport):
    name = "grpc"

    def __init__(
        self,
        lease_s: float,
        host: str = "127.0.0.1",
        port: int = 5600,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        tls: TlsConfig | None = None,
        shared_memory: bool = True,
    ) -> None:
        super().__init__(lease_s)
        self.shared_memory = shared_memory
        self.host = host
        self.port = port
        self.chunk_bytes = chunk_bytes
        self.tls = tls

    def engine_kv_config(self, role: Role, worker_id: str) -> dict[str, Any]:
        return {
            "kv_connector": CONNECTOR_CLASS,
            "kv_connector_module_path": CONNECTOR_MODULE,
            "kv_role": "kv_both",
            "engine_id": worker_id,
            "kv_load_failure_policy": "fail",
            "kv_connector_extra_config": {
                "host": self.host,
                "port": self.port,
                "lease_s": self.lease_s,
                "chunk_bytes": self.chunk_bytes,
                "shared_memory": self.shared_memory,
                # Paths, read by the engine ranks (ConnectorSettings.from_extra).
                "tls": dataclasses.asdict(self.tls) if self.tls else None,
            },
        }

    def prefill_request_params(self) -> dict[str, Any]:
        return {"do_remote_decode": True}

    def handle_from_prefill(
        self, params: dict[str, Any], layout: KvLayout, num_prompt_tokens: int, now_ms: int
    ) -> KvHandle:
        try:
            return KvHandle(
                transport=self.name,
                layout=layout,
                engine_id=str(params["remote_host"]),
                # Indices into the staged copy (the engine's own blocks are already free).
                block_ids=tuple(range(int(params["remote_num_blocks"]))),
                host=str(params["remote_host"]),
                port=int(params["remote_port"]),
                remote_request_id=str(params["remote_request_id"]),
                lease_deadline_unix_ms=now_ms + int(self.lease_s * 1000),
                num_prompt_tokens=num_prompt_tokens,
                extra={"remote_ranks": json.dumps(int(params["remote_ranks"]))},
            )
        except (KeyError, TypeError, ValueError) as e:
            raise KvTransferError(f"prefill engine returned unusable KV parameters: {e}") from e

    def decode_request_params(self, handle: KvHandle) -> dict[str, Any]:
        try:
            ranks = int(json.loads(handle.extra["remote_ranks"]))
        except (KeyError, TypeError, ValueError) as e:
            raise KvTransferError(f"KV handle lacks the producer's rank count: {e}") from e
        return {
            "do_remote_prefill": True,
            "remote_host": handle.host,
            "remote_port": handle.port,
            "remote_ranks": ranks,
            "remote_request_id": handle.remote_request_id,
        }

    def check_shapes(self, producer: KvLayout, consumer: KvLayout) -> None:
        """Every TP/PP pair works: consumers fetch their layers and heads from all ranks."""
