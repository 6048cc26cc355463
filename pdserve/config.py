"""Typed configuration, one dataclass per area. CLI flags and launchers build these.
The router's scheduling section lives in pdserve/scheduling_config.py."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pdserve.errors import ConfigError
from pdserve.scheduling_config import SchedulingConfig


class Role(enum.StrEnum):
    PREFILL = "prefill"
    DECODE = "decode"
    BOTH = "both"


class KvTransport(enum.StrEnum):
    NIXL = "nixl"
    GRPC = "grpc"


class TraceExporter(enum.StrEnum):
    NONE = "none"
    OTLP = "otlp"
    CONSOLE = "console"


@dataclass(frozen=True)
class TracingConfig:
    """OpenTelemetry trace export; off unless an exporter is configured (pdserve/tracing.py).

    ``from_env`` reads the standard variables; the OTLP exporter itself reads the rest
    (OTEL_EXPORTER_OTLP_HEADERS, ..._INSECURE, ..._TIMEOUT, OTEL_BSP_*).
    """

    exporter: TraceExporter = TraceExporter.NONE
    # None: the exporter's own default / OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT.
    otlp_endpoint: str | None = None
    otlp_protocol: str = "grpc"

    @classmethod
    def from_env(cls, env: Mapping[str, str], otlp_endpoint: str | None = None) -> TracingConfig:
        if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return cls()
        protocol = (
            env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or "grpc"
        )
        named = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
        has_endpoint = bool(
            otlp_endpoint
            or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        )
        if named == "none" or (not named and not has_endpoint):
            return cls()
        try:
            exporter = TraceExporter(named or "otlp")
        except ValueError as e:
            raise ConfigError(
                f"OTEL_TRACES_EXPORTER={named!r} is not supported; use otlp, console or none"
            ) from e
        if protocol not in ("grpc", "http/protobuf"):
            raise ConfigError(
                f"OTLP protocol {protocol!r} is not supported; use grpc or http/protobuf"
            )
        return cls(exporter, otlp_endpoint, protocol)


@dataclass(frozen=True)
class TlsConfig:
    """Mutual TLS on the internal gRPC links (router -> worker, worker -> worker KV): each
    side presents ``cert``/``key`` and accepts only peers whose certificate chains to
    ``ca`` (pdserve/tls.py). ``server_name``: the name to check in a server's certificate
    when it is not the host dialled (Kubernetes dials pods by IP)."""

    cert: str
    key: str
    ca: str
    server_name: str | None = None

    @classmethod
    def from_paths(
        cls,
        cert: str | None,
        key: str | None,
        ca: str | None,
        server_name: str | None = None,
    ) -> TlsConfig | None:
        """None when no path is given; all three or none."""
        given = {"--tls-cert": cert, "--tls-key": key, "--tls-ca": ca}
        if not any(given.values()):
            if server_name:
                raise ConfigError("--tls-server-name needs --tls-cert, --tls-key and --tls-ca")
            return None
        if cert and key and ca:
            return cls(cert, key, ca, server_name or None)
        missing = ", ".join(flag for flag, value in given.items() if not value)
        raise ConfigError(f"mutual TLS needs {', '.join(given)}; missing {missing}")


@dataclass(frozen=True)
class EngineConfig:
    """What a worker hands to its vLLM engine."""

    model_path: str
    served_model_name: str
    dtype: str = "float32"
    max_model_len: int = 2048
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # None: eager on CPU (starts in seconds, not minutes of torch.compile), vLLM's
    # default (compiled, CUDA graphs) on accelerators.
    enforce_eager: bool | None = None
    kv_cache_space_gib: int = 1
    seed: int = 0
    # Multi-node engines (deploy/helm: a LeaderWorkerSet group per replica). This worker
    # is node 0; the other nnodes - 1 nodes join it as headless vLLM processes (mp backend,
    # at master_addr:master_port) or as Ray nodes (ray backend). None: vLLM's default.
    nnodes: int = 1
    master_addr: str = ""
    master_port: int = 29501
    distributed_executor_backend: str | None = None

    def __post_init__(self) -> None:
        if self.nnodes < 1:
            raise ConfigError(f"--nnodes must be at least 1, got {self.nnodes}")
        world = self.tensor_parallel_size * self.pipeline_parallel_size
        if world % self.nnodes:
            raise ConfigError(
                f"--nnodes {self.nnodes} must divide tensor x pipeline parallel size {world}"
            )
        if self.distributed_executor_backend not in (None, "mp", "ray"):
            raise ConfigError(
                f"--distributed-executor-backend must be mp or ray, "
                f"got {self.distributed_executor_backend!r}"
            )
        if self.nnodes > 1 and self.distributed_executor_backend != "ray" and not self.master_addr:
            raise ConfigError("--nnodes > 1 with the mp backend needs --master-addr")

    def parallel_args(self) -> dict[str, Any]:
        """The vLLM engine arguments that place this engine's ranks on nodes."""
        args: dict[str, Any] = {
            "tensor_parallel_size": self.tensor_parallel_size,
            "pipeline_parallel_size": self.pipeline_parallel_size,
        }
        if self.distributed_executor_backend is not None:
            args["distributed_executor_backend"] = self.distributed_executor_backend
        # Ray places ranks on the Ray cluster's nodes itself; mp needs the node layout.
        if self.nnodes > 1 and self.distributed_executor_backend != "ray":
            args |= {
                "nnodes": self.nnodes,
                "node_rank": 0,
                "master_addr": self.master_addr,
                "master_port": self.master_port,
            }
        return args

    def eager(self, on_cpu: bool) -> bool:
        return on_cpu if self.enforce_eager is None else self.enforce_eager


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
    # grpc transport: stage KV in /dev/shm, and move it through there between workers
    # that share the mount (same host and user); others get it over the socket.
    kv_shared_memory: bool = True
    # Cores for this worker's engine ranks, e.g. "0|1" for TP=2 (VLLM_CPU_OMP_THREADS_BIND).
    cpu_bind: str | None = None
    # Seconds a draining worker waits for in-flight requests before it exits.
    drain_timeout_s: float = 30.0
    # vLLM KV cache events for the router's prefix index: ZMQ PUB on this port, replay
    # (ROUTER) on the next one. None: no events.
    kv_events_port: int | None = None
    tracing: TracingConfig = field(default_factory=TracingConfig)
    # Mutual TLS for the Worker API and the gRPC KV transport; None: plaintext.
    tls: TlsConfig | None = None
    # A plaintext port serving only grpc.health.v1 (kubelet gRPC probes cannot do mTLS).
    health_port: int | None = None


class DiscoveryMode(enum.StrEnum):
    STATIC = "static"
    KUBERNETES = "kubernetes"
    # The `pdserve up` launcher's control endpoint (deploy/local/control.py).
    LAUNCHER = "launcher"
    # The registry actor of a `pdserve up --backend ray` cluster (deploy/ray/actors.py).
    RAY = "ray"


@dataclass(frozen=True)
class DiscoveryConfig:
    """How the router finds its workers: the ``discovery`` section of router.yaml.

    ``static``: the addresses on the command line (RouterConfig.*_workers).
    ``kubernetes``: the ready pods in ``namespace`` matching ``selectors[role]``, reached
    at podIP:worker_port.
    ``launcher``: the members the launcher at ``launcher_url`` lists (`pdserve up`).
    ``ray``: the members the cluster's registry actor in ``ray_namespace`` of the Ray
    cluster at ``ray_address`` lists (`pdserve up --backend ray`).
    """

    mode: DiscoveryMode = DiscoveryMode.STATIC
    # Empty: the namespace the router pod runs in.
    namespace: str = ""
    worker_port: int = WorkerConfig.port
    # Kubernetes label selector per role, e.g. "app.kubernetes.io/instance=x,pdserve.io/role=y".
    selectors: Mapping[Role, str] = field(default_factory=dict)
    # Launcher mode: the launcher's control endpoint, e.g. http://127.0.0.1:50050.
    launcher_url: str = ""
    # Ray mode: the Ray cluster's address (GCS host:port) and the cluster's namespace.
    ray_address: str = ""
    ray_namespace: str = "pdserve"

    def __post_init__(self) -> None:
        if self.mode is DiscoveryMode.LAUNCHER and not self.launcher_url:
            raise ConfigError("launcher discovery needs the launcher's URL (--launcher-url)")
        if self.mode is DiscoveryMode.RAY and not (self.ray_address and self.ray_namespace):
            raise ConfigError("ray discovery needs --ray-address and --ray-namespace")
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
class HealthConfig:
    """The router's per-worker circuit breaker (router/health.py)."""

    # Consecutive failures (health checks past their deadline, failed requests) that open it.
    failure_threshold: int = 3
    # Seconds an open breaker waits before its half-open probe (the next health check).
    cooldown_s: float = 5.0
    # Deadline of one active health check; a hung (e.g. SIGSTOPped) worker misses it.
    # 5 s: on a small, busy machine a healthy worker can take seconds to answer.
    check_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if self.failure_threshold < 1 or self.cooldown_s < 0 or self.check_timeout_s <= 0:
            raise ConfigError(f"invalid health settings: {self}")


@dataclass(frozen=True)
class RetryConfig:
    """Failover of requests whose worker failed (router/retry.py, docs/adr/0010)."""

    # Extra attempts on other workers for a request that failed before its first token.
    budget: int = 1
    # Base of the jittered backoff before a retry (uniform in [0.5, 1.5) x base).
    backoff_s: float = 0.05
    # How many times one stream may move to another decode worker after its first token.
    max_migrations: int = 1

    def __post_init__(self) -> None:
        if self.budget < 0 or self.backoff_s < 0 or self.max_migrations < 0:
            raise ConfigError(f"invalid retry settings: {self}")


@dataclass(frozen=True)
class AdmissionConfig:
    """Overload protection (router/admission.py); 0 means no limit."""

    # Requests the router serves at once; more wait in the queue.
    max_in_flight: int = 256
    # Requests waiting for a slot; beyond it (or after queue_timeout_s) -> 429.
    max_queue: int = 256
    queue_timeout_s: float = 10.0
    # Requests this router runs on one decode/colocated worker at once.
    max_in_flight_per_worker: int = 0
    # Retry-After seconds sent with a 429.
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        values = (self.max_in_flight, self.max_queue, self.max_in_flight_per_worker)
        if min(values) < 0 or self.queue_timeout_s < 0 or self.retry_after_s < 0:
            raise ConfigError(f"invalid admission settings: {self}")


@dataclass(frozen=True)
class AuthConfig:
    """Client authentication (router/auth.py): no keys -> open API."""

    api_keys: tuple[str, ...] = ()
    # Requests per second per API key (token bucket); 0: no rate limit.
    rate_limit_rps: float = 0.0
    rate_limit_burst: int = 10
    # Per-tenant prefix-cache isolation (router/tenancy.py): tenants are API keys, or the
    # x-pdserve-tenant header when there are no keys.
    tenant_isolation: bool = False


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
    health: HealthConfig = field(default_factory=HealthConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    max_body_bytes: int = 4 * 1024 * 1024
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    scheduling: SchedulingConfig = field(default_factory=SchedulingConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    # Completed request timelines kept for `pdserve inspect` (0: none unless tracing is on,
    # then DEFAULT_TIMELINE_RING).
    timeline_ring: int = 0
    # Mutual TLS towards the workers; None: plaintext.
    tls: TlsConfig | None = None


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
class RayConfig:
    """Where `pdserve up --backend ray` runs its worker actors."""

    # A Ray cluster to join (e.g. 127.0.0.1:6379 after `ray start --head`); empty: start a
    # Ray runtime for this cluster alone, with ``num_cpus`` CPUs (0: this machine's count).
    address: str = ""
    # Where the cluster's named actors live: one pdserve cluster per namespace.
    namespace: str = "pdserve"
    num_cpus: int = 0

    def __post_init__(self) -> None:
        if not self.namespace:
            raise ConfigError("--ray-namespace must not be empty")
        if self.num_cpus < 0:
            raise ConfigError(f"--ray-num-cpus must be >= 0, not {self.num_cpus}")


@dataclass(frozen=True)
class ClusterConfig:
    """What `pdserve up` starts on one machine."""

    model: str
    prefill: PoolConfig = PoolConfig(1)
    decode: PoolConfig = PoolConfig(1)
    both: PoolConfig = PoolConfig(0)
    http_port: int = RouterConfig.http_port
    grpc_port: int = RouterConfig.grpc_port
    # The first worker's ports; the launcher counts up from them for the others.
    worker_base_port: int = WorkerConfig.port
    metrics_base_port: int = WorkerConfig.metrics_port
    kv_base_port: int = WorkerConfig.kv_port
    max_model_len: int = EngineConfig.max_model_len
    served_model_name: str | None = None
    kv_transport: KvTransport = WorkerConfig.kv_transport
    kv_lease_s: float = WorkerConfig.kv_lease_s
    kv_shared_memory: bool = WorkerConfig.kv_shared_memory
    # The launcher's control endpoint on 127.0.0.1 (`pdserve scale`, router discovery).
    control_port: int = 50050
    # The router's worker choice for both pools (None: its default) and when it splits
    # prefill from decode (None: its default).
    policy: str | None = None
    disaggregation: str | None = None
