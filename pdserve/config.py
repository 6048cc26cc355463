"""Typed configuration, one dataclass per area. CLI flags and launchers build these."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Role(enum.StrEnum):
    PREFILL = "prefill"
    DECODE = "decode"
    BOTH = "both"


class KvTransport(enum.StrEnum):
    NIXL = "nixl"


@dataclass(frozen=True)
class EngineConfig:
    """What a worker hands to its vLLM engine."""

    model_path: str
    served_model_name: str
    dtype: str = "float32"
    max_model_len: int = 2048
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # vLLM's CPU pipeline parallelism needs the torch.compile path (fails with eager).
    enforce_eager: bool | None = None
    kv_cache_space_gib: int = 1
    seed: int = 0

    @property
    def eager(self) -> bool:
        if self.enforce_eager is not None:
            return self.enforce_eager
        return self.pipeline_parallel_size == 1


@dataclass(frozen=True)
class WorkerConfig:
    role: Role
    engine: EngineConfig
    worker_id: str
    host: str = "127.0.0.1"
    port: int = 50100
    metrics_port: int = 9100
    kv_transport: KvTransport = KvTransport.NIXL
    # NIXL side-channel (handshake) port; ranks use kv_port + rank.
    kv_port: int = 5600
    # How long a prefill worker keeps a request's KV for a decode pull.
    kv_lease_s: float = 30.0
    # Cores for this worker's engine ranks, e.g. "0|1" for TP=2 (VLLM_CPU_OMP_THREADS_BIND).
    cpu_bind: str | None = None
    # Seconds a draining worker waits for in-flight requests before it exits.
    drain_timeout_s: float = 30.0


@dataclass(frozen=True)
class RouterConfig:
    model_path: str
    served_model_name: str
    prefill_workers: tuple[str, ...] = ()
    decode_workers: tuple[str, ...] = ()
    both_workers: tuple[str, ...] = ()
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 50051
    # Seconds between worker health/load polls.
    poll_interval_s: float = 1.0
    # Deadline for one worker call that should answer quickly (info, load, abort).
    worker_rpc_timeout_s: float = 5.0
    max_body_bytes: int = 4 * 1024 * 1024


@dataclass(frozen=True)
class PoolConfig:
    """One pool of identical workers."""

    replicas: int
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1

    @property
    def ranks(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


@dataclass(frozen=True)
class ClusterConfig:
    """What `pdserve up` starts on one machine."""

    model: str
    prefill: PoolConfig = PoolConfig(1)
    decode: PoolConfig = PoolConfig(1)
    both: PoolConfig = PoolConfig(0)
    http_port: int = 8000
    grpc_port: int = 50051
    worker_base_port: int = 50100
    metrics_base_port: int = 9100
    kv_base_port: int = 5600
    max_model_len: int = 2048
    served_model_name: str | None = None
    kv_transport: KvTransport = KvTransport.NIXL
    kv_lease_s: float = 30.0
