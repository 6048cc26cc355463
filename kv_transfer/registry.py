"""The transport registry: one place that maps a configured name to a KvTransport."""

from __future__ import annotations

from pdserve.config import TlsConfig
from pdserve.errors import KvTransferError
from pdserve.kv_transfer.base import KvTransport
from pdserve.kv_transfer.grpc_transport import GrpcTransport
from pdserve.kv_transfer.nixl import NixlTransport


def transport_for(
    name: str,
    lease_s: float,
    host: str = "127.0.0.1",
    port: int = 5600,
    tls: TlsConfig | None = None,
    shared_memory: bool = True,
) -> KvTransport:
    """``host``/``port``: the worker's KV address (grpc: ranks serve on port + rank).
    ``tls``: mutual TLS between the workers' KV endpoints (grpc only; NIXL has none).
    ``shared_memory``: grpc's same-host /dev/shm path (ADR 0015)."""
    if name == NixlTransport.name:
        return NixlTransport(lease_s)
    if name == GrpcTransport.name:
        return GrpcTransport(lease_s, host=host, port=port, tls=tls, shared_memory=shared_memory)
    raise KvTransferError(f"unknown KV transport {name!r}; available: nixl, grpc")
