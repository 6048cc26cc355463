"""Typed configuration, one dataclass per area. CLI flags and launchers build these."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pdserve.errors import ConfigError


class Role(enum.StrEnum):
    PREFILL = "prefill"
    DECODE = "decode"
    BOTH = "both"


class KvTransport(enum.StrEnum):
    NIXL = "nixl"
    GRPC = "grpc"


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


class DiscoveryMode(enum.StrEnum):
    STATIC = "static"
    KUBERNETES = "kubernetes"
    # The `pdserve up` launcher's control endpoint (deploy/local/control.py).
    LAUNCHER = "launcher"


@dataclass(frozen=True)
class DiscoveryConfig:
    """How the router finds its workers: the ``discovery`` section of router.yaml.

    ``static``: the addresses on the command line (RouterConfig.*_workers).
    ``kubernetes``: the ready pods in ``namespace`` matching ``selectors[role]``, reached
    at podIP:worker_port.
    ``launcher``: the members the launcher at ``launcher_url`` lists (`pdserve up`).
    """

    mode: DiscoveryMode = DiscoveryMode.STATIC
    # Empty: the namespace the router pod runs in.
    namespace: str = ""
    worker_port: int = 50100
    # Kubernetes label selector per role, e.g. "app.kubernetes.io/instance=x,pdserve.io/role=y".
    selectors: Mapping[Role, str] = field(default_factory=dict)
    # Launcher mode: the launcher's control endpoint, e.g. http://127.0.0.1:50050.
    launcher_url: str = ""

    def __post_init__(self) -> None:
        if self.mode is DiscoveryMode.LAUNCHER and not self.launcher_url:
            raise ConfigError("launcher discovery needs the launcher's URL (--launcher-url)")
        if not 0 < self.worker_port < 65536:
            raise ConfigError(f"discovery.workerPort {self.worker_port} is not a TCP port")
        roles = set(self.selectors)
        if self.mode is DiscoveryMode.KUBERNETES and not (
            Role.BOTH in roles or {Role.PREFILL, Role.DECODE} <= roles
        ):
            raise ConfigError(
                "kubernetes discovery needs discovery.pools with a labelSelector for "
                "prefill and decode (or both)"
            )

    @classmethod
    def from_dict(cls, section: Mapping[str, Any]) -> DiscoveryConfig:
        """Parse router.yaml's ``discovery`` section, with the Helm chart's key names:
        ``mode``, ``namespace``, ``workerPort``, ``pools: {ROLE: {labelSelector: ...}}``."""
        unknown = set(section) - {"mode", "namespace", "workerPort", "pools"}
        if unknown:
            raise ConfigError(f"discovery: unknown keys {sorted(unknown)}")
        try:
            mode = DiscoveryMode(section.get("mode", DiscoveryMode.STATIC))
        except ValueError as e:
            raise ConfigError(f"discovery.mode: {e}; use static or kubernetes") from e
        namespace = section.get("namespace") or ""
        port = section.get("workerPort", cls.worker_port)
        pools = section.get("pools") or {}
        if not isinstance(namespace, str):
            raise ConfigError("discovery.namespace must be a string")
        if not isinstance(port, int) or isinstance(port, bool):
            raise ConfigError("discovery.workerPort must be an integer")
        if not isinstance(pools, Mapping):
            raise ConfigError("discovery.pools must map a role to {labelSelector: ...}")
        selectors: dict[Role, str] = {}
        for name, pool in pools.items():
            try:
                role = Role(name)
            except ValueError as e:
                raise ConfigError(f"discovery.pools: {e}; use prefill, decode, both") from e
            if not isinstance(pool, Mapping) or set(pool) != {"labelSelector"}:
                raise ConfigError(f"discovery.pools.{name} needs labelSelector and nothing else")
            selector = pool["labelSelector"]
            if not isinstance(selector, str) or not selector.strip():
                raise ConfigError(f"discovery.pools.{name}.labelSelector must be a string")
            selectors[role] = selector
        return cls(mode, namespace, port, selectors)


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
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)


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
    # The launcher's control endpoint on 127.0.0.1 (`pdserve scale`, router discovery).
    control_port: int = 50050
