"""The ``pdserve`` command line."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path
from typing import Annotated

import typer

from pdserve.config import (
    AdmissionConfig,
    AuthConfig,
    ClusterConfig,
    DisaggregationMode,
    DiscoveryConfig,
    DiscoveryMode,
    EngineConfig,
    HealthConfig,
    PolicyConfig,
    PoolConfig,
    RayConfig,
    RetryConfig,
    Role,
    RouterConfig,
    SchedulingConfig,
    TlsConfig,
    TracingConfig,
    WorkerConfig,
)
from pdserve.errors import ConfigError
from pdserve.models import DEFAULT_MODEL

app = typer.Typer(
    help="pdserve: disaggregated prefill/decode LLM serving on vLLM.", no_args_is_help=True
)


LOG_FORMAT_ENV = "PDSERVE_LOG_FORMAT"
LogFormatOption = Annotated[
    str | None,
    typer.Option(
        help=f"text | json (JSON lines with request and trace ids); default ${LOG_FORMAT_ENV}"
    ),
]
OtlpEndpointOption = Annotated[
    str | None,
    typer.Option(help="export traces by OTLP to this endpoint (else the OTEL_* variables decide)"),
]
# Options that several commands take, declared once (their defaults: pdserve/config.py).
ModelOption = Annotated[
    str, typer.Option(help="'default' (SmolLM2-135M-Instruct), 'tiny', or a model folder")
]
ServedModelNameOption = Annotated[str | None, typer.Option(help="model id clients use")]
KvTransportOption = Annotated[str, typer.Option(help="nixl | grpc")]
HttpPortOption = Annotated[int, typer.Option(help="the router's OpenAI-compatible HTTP API")]
GrpcPortOption = Annotated[int, typer.Option(help="the router's gRPC API (pdserve.v1.Inference)")]
PolicyOption = Annotated[
    str | None,
    typer.Option(
        help="worker choice: round_robin, random, least_load, prefix, kv_aware, session "
        "(default kv_aware; the config file's scheduling section can reweight them)"
    ),
]
DisaggregationOption = Annotated[
    str | None,
    typer.Option(help="always | never | auto (per request, by the transfer-cost model)"),
]
# Mutual TLS on the internal links (router <-> workers, worker <-> worker KV over gRPC).
TlsCertOption = Annotated[
    str | None, typer.Option(help="mTLS: this process's certificate (PEM); with --tls-key/-ca")
]
TlsKeyOption = Annotated[str | None, typer.Option(help="mTLS: the certificate's private key")]
TlsCaOption = Annotated[
    str | None, typer.Option(help="mTLS: CA bundle that peers' certificates must chain to")
]
TlsServerNameOption = Annotated[
    str | None,
    typer.Option(help="mTLS: name expected in workers' certificates (default: the host dialled)"),
]


def _setup_logging(level: str, log_format: str | None = None) -> None:
    from pdserve.logs import LOG_FORMATS, setup_logging

    log_format = log_format or os.environ.get(LOG_FORMAT_ENV) or "text"
    if log_format not in LOG_FORMATS:
        raise typer.BadParameter(f"use one of {LOG_FORMATS}", param_hint="--log-format")
    setup_logging(level, log_format)


def _tracing_config(otlp_endpoint: str | None) -> TracingConfig:
    try:
        return TracingConfig.from_env(os.environ, otlp_endpoint)
    except ConfigError as e:
        raise typer.BadParameter(e.message, param_hint="--otlp-endpoint / OTEL_*") from e


def _tls_config(
    cert: str | None, key: str | None, ca: str | None, server_name: str | None
) -> TlsConfig | None:
    """The mTLS flags, with the files read now: a bad path fails before any engine starts."""
    from pdserve.tls import TlsMaterial

    try:
        tls = TlsConfig.from_paths(cert, key, ca, server_name)
        if tls is not None:
            TlsMaterial.load(tls)
    except ConfigError as e:
        raise typer.BadParameter(e.message, param_hint="--tls-*") from e
    return tls


def _model_name(path: Path, served: str | None) -> str:
    return served or path.name


@app.command()
def up(
    model: ModelOption = DEFAULT_MODEL,
    prefill: Annotated[int, typer.Option(help="prefill workers")] = 1,
    decode: Annotated[int, typer.Option(help="decode workers")] = 1,
    both: Annotated[int, typer.Option(help="colocated workers (prefill and decode in one)")] = 0,
    prefill_tp: int = 1,
    prefill_pp: int = 1,
    decode_tp: int = 1,
    decode_pp: int = 1,
    kv_transport: KvTransportOption = ClusterConfig.kv_transport.value,
    http_port: HttpPortOption = ClusterConfig.http_port,
    grpc_port: GrpcPortOption = ClusterConfig.grpc_port,
    worker_base_port: int = ClusterConfig.worker_base_port,
    metrics_base_port: int = ClusterConfig.metrics_base_port,
    kv_base_port: int = ClusterConfig.kv_base_port,
    max_model_len: int = ClusterConfig.max_model_len,
    served_model_name: ServedModelNameOption = None,
    kv_lease_s: float = ClusterConfig.kv_lease_s,
    log_dir: Annotated[
        Path | None, typer.Option(help="worker/router logs (default: a temp folder)")
    ] = None,
    backend: Annotated[
        str, typer.Option(help="local: processes; ray: workers under Ray actors (docs/ray.md)")
    ] = "local",
    ray_address: Annotated[
        str | None,
        typer.Option(help="--backend ray: join this Ray cluster (default: start a local one)"),
    ] = None,
    ray_namespace: Annotated[
        str, typer.Option(help="--backend ray: the Ray namespace of this cluster's actors")
    ] = RayConfig.namespace,
    ray_num_cpus: Annotated[
        int, typer.Option(help="--backend ray without --ray-address: CPUs of the local Ray")
    ] = RayConfig.num_cpus,
    log_format: LogFormatOption = None,
    otlp_endpoint: OtlpEndpointOption = None,
    control_port: Annotated[
        int, typer.Option(help="control endpoint on 127.0.0.1 (`pdserve scale`)")
    ] = 50050,
    policy: PolicyOption = None,
    disaggregation: DisaggregationOption = None,
) -> None:
    """Start a router and prefill/decode workers on this machine, in the foreground."""
    from pdserve.config import KvTransport
    from pdserve.deploy.local.launcher import run_cluster

    if backend not in ("local", "ray"):
        raise typer.BadParameter("use --backend local or ray", param_hint="--backend")
    config = ClusterConfig(
        model=model,
        prefill=PoolConfig(prefill, prefill_tp, prefill_pp),
        decode=PoolConfig(decode, decode_tp, decode_pp),
        both=PoolConfig(both),
        http_port=http_port,
        grpc_port=grpc_port,
        worker_base_port=worker_base_port,
        metrics_base_port=metrics_base_port,
        kv_base_port=kv_base_port,
        max_model_len=max_model_len,
        served_model_name=served_model_name,
        kv_transport=KvTransport(kv_transport),
        kv_lease_s=kv_lease_s,
        control_port=control_port,
        policy=policy,
        disaggregation=disaggregation,
    )
    try:
        # The router and workers inherit these (they read them at start-up).
        if log_format:
            os.environ[LOG_FORMAT_ENV] = log_format
        if otlp_endpoint:
            os.environ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = otlp_endpoint
        if backend == "ray":
            from pdserve.deploy.ray.launcher import run_ray_cluster

            ray_config = RayConfig(ray_address or "", ray_namespace, ray_num_cpus)
            code = run_ray_cluster(config, ray_config, log_dir)
        else:
            code = run_cluster(config, log_dir)
    except ConfigError as e:
        typer.secho(f"error: {e.message}", fg="red", err=True)
        raise typer.Exit(2) from e
    raise typer.Exit(code)


@app.command()
def worker(
    role: Annotated[Role, typer.Option(help="prefill | decode | both")],
    model: ModelOption = DEFAULT_MODEL,
    served_model_name: ServedModelNameOption = None,
    worker_id: Annotated[str | None, typer.Option(help="unique id (default: role-port)")] = None,
    host: str = WorkerConfig.host,
    port: int = WorkerConfig.port,
    metrics_port: int = WorkerConfig.metrics_port,
    kv_transport: KvTransportOption = WorkerConfig.kv_transport.value,
    kv_port: Annotated[
        int, typer.Option(help="NIXL side channel / gRPC KV server port (ranks: + rank)")
    ] = WorkerConfig.kv_port,
    kv_events_port: Annotated[
        int | None,
        typer.Option(help="publish vLLM KV cache events here (replay: the next port)"),
    ] = None,
    kv_lease_s: float = WorkerConfig.kv_lease_s,
    tensor_parallel_size: int = EngineConfig.tensor_parallel_size,
    pipeline_parallel_size: int = EngineConfig.pipeline_parallel_size,
    nnodes: Annotated[
        int, typer.Option(help="nodes the engine spans; this worker is node 0")
    ] = EngineConfig.nnodes,
    master_addr: Annotated[
        str, typer.Option(help="mp backend, nnodes > 1: this node's address the others join")
    ] = EngineConfig.master_addr,
    master_port: int = EngineConfig.master_port,
    distributed_executor_backend: Annotated[
        str | None, typer.Option(help="mp | ray (default: vLLM's choice)")
    ] = None,
    max_model_len: int = EngineConfig.max_model_len,
    dtype: str = EngineConfig.dtype,
    enforce_eager: Annotated[bool | None, typer.Option(help="default: eager on CPU")] = None,
    kv_cache_space_gib: int = EngineConfig.kv_cache_space_gib,
    cpu_bind: Annotated[str | None, typer.Option(help="VLLM_CPU_OMP_THREADS_BIND value")] = None,
    log_level: str = "info",
    log_format: LogFormatOption = None,
    otlp_endpoint: OtlpEndpointOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
    tls_ca: TlsCaOption = None,
    tls_server_name: TlsServerNameOption = None,
    health_port: Annotated[
        int | None,
        typer.Option(help="also serve only grpc.health.v1 here, in plaintext (probes with mTLS)"),
    ] = None,
) -> None:
    """Run one worker: a vLLM engine behind the internal gRPC Worker API."""
    from pdserve.config import KvTransport
    from pdserve.models import resolve_model
    from pdserve.worker.server import serve

    _setup_logging(log_level, log_format)
    tls = _tls_config(tls_cert, tls_key, tls_ca, tls_server_name)
    path = resolve_model(model)
    try:
        engine = EngineConfig(
            model_path=str(path),
            served_model_name=_model_name(path, served_model_name),
            dtype=dtype,
            max_model_len=max_model_len,
            tensor_parallel_size=tensor_parallel_size,
            pipeline_parallel_size=pipeline_parallel_size,
            nnodes=nnodes,
            master_addr=master_addr,
            master_port=master_port,
            distributed_executor_backend=distributed_executor_backend,
            enforce_eager=enforce_eager,
            kv_cache_space_gib=kv_cache_space_gib,
        )
    except ConfigError as e:
        raise typer.BadParameter(e.message, param_hint="--nnodes / --master-*") from e
    config = WorkerConfig(
        role=role,
        engine=engine,
        worker_id=worker_id or f"{role.value}-{port}",
        host=host,
        port=port,
        metrics_port=metrics_port,
        kv_transport=KvTransport(kv_transport),
        kv_port=kv_port,
        kv_lease_s=kv_lease_s,
        cpu_bind=cpu_bind,
        tracing=_tracing_config(otlp_endpoint),
        kv_events_port=kv_events_port,
        tls=tls,
        health_port=health_port,
    )
    asyncio.run(serve(config))


def _discovery_config(
    mode: DiscoveryMode | None,
    config_file: Path | None,
    launcher_url: str | None = None,
    ray_address: str | None = None,
    ray_namespace: str | None = None,
) -> DiscoveryConfig:
    """The ``discovery`` section of the router's config file; ``--discovery`` wins over
    its ``mode``."""
    import yaml

    section: object = {}
    if config_file is not None:
        try:
            doc = yaml.safe_load(config_file.read_text())
        except (OSError, yaml.YAMLError) as e:
            message = f"cannot read {config_file}: {e}"
            raise typer.BadParameter(message, param_hint="--config") from e
        if doc is not None and not isinstance(doc, dict):
            raise typer.BadParameter("must be a YAML mapping", param_hint="--config")
        section = (doc or {}).get("discovery") or {}
    if not isinstance(section, dict):
        raise typer.BadParameter("its discovery section must be a mapping", param_hint="--config")
    try:
        parsed = DiscoveryConfig.from_dict(section)
        return dataclasses.replace(
            parsed,
            mode=mode or parsed.mode,
            launcher_url=launcher_url or parsed.launcher_url,
            ray_address=ray_address or parsed.ray_address,
            ray_namespace=ray_namespace or parsed.ray_namespace,
        )
    except ConfigError as e:
        raise typer.BadParameter(e.message, param_hint="--config") from e


def _scheduling_config(
    config_file: Path | None,
    prefill_policy: str | None,
    decode_policy: str | None,
    disaggregation: str | None,
) -> SchedulingConfig:
    """The config file's ``scheduling`` section; flags win over it."""
    import yaml

    from pdserve.router.scheduling.policy import POLICIES

    doc = yaml.safe_load(config_file.read_text()) if config_file is not None else None
    section = (doc or {}).get("scheduling") or {} if isinstance(doc, dict) else {}
    try:
        parsed = SchedulingConfig.from_dict(section)
        if prefill_policy:
            parsed = dataclasses.replace(parsed, prefill=PolicyConfig(prefill_policy))
        if decode_policy:
            parsed = dataclasses.replace(parsed, decode=PolicyConfig(decode_policy))
        if disaggregation:
            mode = DisaggregationMode(disaggregation)
            split = dataclasses.replace(parsed.disaggregation, mode=mode)
            parsed = dataclasses.replace(parsed, disaggregation=split)
    except (ConfigError, ValueError) as e:
        raise typer.BadParameter(str(e), param_hint="--config / --policy") from e
    for name in (parsed.prefill.name, parsed.decode.name):
        if name not in POLICIES:
            raise typer.BadParameter(f"unknown policy {name!r}; use one of {', '.join(POLICIES)}")
    return parsed


@app.command()
def router(
    model: Annotated[
        str, typer.Option(help="'default', 'tiny' or a model folder (for the tokenizer)")
    ] = DEFAULT_MODEL,
    served_model_name: ServedModelNameOption = None,
    prefill: Annotated[
        list[str] | None, typer.Option(help="prefill worker host:port (repeat)")
    ] = None,
    decode: Annotated[
        list[str] | None, typer.Option(help="decode worker host:port (repeat)")
    ] = None,
    both: Annotated[
        list[str] | None, typer.Option(help="colocated worker host:port (repeat)")
    ] = None,
    discovery: Annotated[
        DiscoveryMode | None,
        typer.Option(
            help="static: the --prefill/--decode/--both list; kubernetes: watch pods "
            "(selectors from --config); launcher: follow `pdserve up` (--launcher-url); "
            "ray: follow `pdserve up --backend ray` (--ray-address). "
            "Default: the config file's mode, else static"
        ),
    ] = None,
    launcher_url: Annotated[
        str | None, typer.Option(help="the `pdserve up` control endpoint (launcher discovery)")
    ] = None,
    ray_address: Annotated[
        str | None, typer.Option(help="ray discovery: the Ray cluster (GCS host:port)")
    ] = None,
    ray_namespace: Annotated[
        str, typer.Option(help="ray discovery: the cluster's Ray namespace")
    ] = RayConfig.namespace,
    config_file: Annotated[
        Path | None,
        typer.Option("--config", help="router.yaml: its discovery section (Helm ConfigMap)"),
    ] = None,
    policy: PolicyOption = None,
    prefill_policy: Annotated[str | None, typer.Option(help="for prefill; over --policy")] = None,
    decode_policy: Annotated[str | None, typer.Option(help="for decode; over --policy")] = None,
    disaggregation: DisaggregationOption = None,
    http_host: str = RouterConfig.http_host,
    http_port: HttpPortOption = RouterConfig.http_port,
    grpc_host: str = RouterConfig.grpc_host,
    grpc_port: GrpcPortOption = RouterConfig.grpc_port,
    log_level: str = "info",
    log_format: LogFormatOption = None,
    otlp_endpoint: OtlpEndpointOption = None,
    timeline_ring: Annotated[
        int,
        typer.Option(
            help="completed request timelines kept for `pdserve inspect` (0: 256 when "
            "traces are exported, else none)",
            min=0,
        ),
    ] = 0,
    api_key: Annotated[
        list[str] | None,
        typer.Option(
            envvar="PDSERVE_API_KEY",
            help="accepted client API key (repeat; env: comma-separated); none: open API",
        ),
    ] = None,
    rate_limit_rps: Annotated[
        float, typer.Option(help="requests/s per API key (0: no limit)", min=0)
    ] = 0.0,
    tenant_isolation: Annotated[
        bool,
        typer.Option(
            help="separate prefix caches per tenant (API key; without keys the "
            "x-pdserve-tenant header), so no tenant can probe another's prompts by timing"
        ),
    ] = AuthConfig.tenant_isolation,
    max_in_flight: Annotated[
        int, typer.Option(help="requests served at once (0: no limit)", min=0)
    ] = AdmissionConfig.max_in_flight,
    max_queue: Annotated[
        int, typer.Option(help="requests waiting for a slot; more get 429", min=0)
    ] = AdmissionConfig.max_queue,
    queue_timeout: Annotated[
        float, typer.Option(help="seconds a request may wait for a slot", min=0)
    ] = AdmissionConfig.queue_timeout_s,
    retry_budget: Annotated[
        int, typer.Option(help="retries on other workers before the first token", min=0)
    ] = RetryConfig.budget,
    health_check_timeout: Annotated[
        float, typer.Option(help="deadline of a worker health check (s)", min=0.01)
    ] = HealthConfig.check_timeout_s,
    breaker_failures: Annotated[
        int, typer.Option(help="consecutive failures that open a worker's circuit", min=1)
    ] = HealthConfig.failure_threshold,
    breaker_cooldown: Annotated[
        float, typer.Option(help="seconds an open circuit waits for its probe", min=0)
    ] = HealthConfig.cooldown_s,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
    tls_ca: TlsCaOption = None,
    tls_server_name: TlsServerNameOption = None,
) -> None:
    """Run the router: OpenAI-compatible HTTP API and gRPC API in front of the workers."""
    from pdserve.models import resolve_model
    from pdserve.router.app import serve

    _setup_logging(log_level, log_format)
    discovery_config = _discovery_config(
        discovery, config_file, launcher_url, ray_address, ray_namespace
    )
    if discovery_config.mode is not DiscoveryMode.STATIC:
        if prefill or decode or both:
            raise typer.BadParameter("--prefill/--decode/--both are for --discovery=static")
    elif not (both or (prefill and decode)):
        raise typer.BadParameter("give --both workers, or --prefill and --decode workers")
    path = resolve_model(model)
    config = RouterConfig(
        model_path=str(path),
        served_model_name=_model_name(path, served_model_name),
        prefill_workers=tuple(prefill or ()),
        decode_workers=tuple(decode or ()),
        both_workers=tuple(both or ()),
        http_host=http_host,
        http_port=http_port,
        grpc_host=grpc_host,
        grpc_port=grpc_port,
        discovery=discovery_config,
        scheduling=_scheduling_config(
            config_file, prefill_policy or policy, decode_policy or policy, disaggregation
        ),
        tracing=_tracing_config(otlp_endpoint),
        timeline_ring=timeline_ring,
        health=HealthConfig(breaker_failures, breaker_cooldown, health_check_timeout),
        retry=RetryConfig(budget=retry_budget),
        admission=AdmissionConfig(
            max_in_flight=max_in_flight, max_queue=max_queue, queue_timeout_s=queue_timeout
        ),
        auth=AuthConfig(
            api_keys=_api_keys(api_key),
            rate_limit_rps=rate_limit_rps,
            tenant_isolation=tenant_isolation,
        ),
        tls=_tls_config(tls_cert, tls_key, tls_ca, tls_server_name),
    )
    asyncio.run(serve(config))


def _api_keys(values: list[str] | None) -> tuple[str, ...]:
    """--api-key values; PDSERVE_API_KEY may hold several, comma-separated."""
    keys = [k.strip() for v in values or () for k in v.split(",")]
    return tuple(k for k in keys if k)


@app.command()
def scale(
    role: Annotated[Role, typer.Argument(help="prefill | decode | both")],
    replicas: Annotated[int, typer.Argument(help="workers wanted in that pool", min=0)],
    control_url: Annotated[
        str, typer.Option(help="the `pdserve up` control endpoint")
    ] = "http://127.0.0.1:50050",
    wait: Annotated[bool, typer.Option(help="wait until the pools have settled")] = True,
    timeout_s: Annotated[float, typer.Option(help="how long to wait")] = 900.0,
    ray_address: Annotated[
        str | None,
        typer.Option(help="a `pdserve up --backend ray` cluster: find it through this Ray"),
    ] = None,
    ray_namespace: Annotated[
        str, typer.Option(help="with --ray-address: the cluster's Ray namespace")
    ] = RayConfig.namespace,
) -> None:
    """Resize a pool of a running `pdserve up` cluster without dropping requests: new
    workers join once their engine is ready, removed ones are drained first."""
    from pdserve.autoscale.scaler import LauncherScaler
    from pdserve.errors import ScalingError

    try:
        scaler = LauncherScaler(control_url)
        if ray_address:
            from pdserve.autoscale.ray_scaler import RayScaler

            scaler = RayScaler.connect(ray_address, ray_namespace)
        scaler.scale(role, replicas)
        if wait:
            view = scaler.wait_settled(timeout_s)
            sizes = ", ".join(f"{name} {p['serving']}" for name, p in view["pools"].items())
            typer.echo(f"settled: {sizes}")
            if view["pools"][role.value]["serving"] != replicas:
                # A new worker failed to start: the launcher's log says why.
                raise ScalingError(f"the {role.value} pool settled at {sizes}, not {replicas}")
    except (ScalingError, ConfigError) as e:
        typer.secho(f"error: {e.message}", fg="red", err=True)
        raise typer.Exit(1) from e


@app.command()
def inspect(
    request_id: Annotated[str, typer.Argument(help="the request id (X-Request-Id)")],
    router_url: Annotated[
        str, typer.Option("--router", help="the router's HTTP address")
    ] = "http://127.0.0.1:8000",
    as_json: Annotated[bool, typer.Option("--json", help="print the raw timeline")] = False,
) -> None:
    """Print the timeline of a recent request from the router's ring of request traces."""
    import httpx

    from pdserve.router.timeline import Timeline, format_timeline

    url = f"{router_url.rstrip('/')}/debug/requests/{request_id}"
    try:
        response = httpx.get(url, timeout=10)
    except httpx.HTTPError as e:
        typer.secho(f"error: cannot reach the router at {router_url}: {e}", fg="red", err=True)
        raise typer.Exit(1) from e
    if response.status_code != 200:
        typer.secho(f"error: {response.json().get('error', response.text)}", fg="red", err=True)
        raise typer.Exit(1)
    if as_json:
        typer.echo(response.text)
    else:
        typer.echo(format_timeline(Timeline.from_json(response.json())))


@app.command("prepare-model")
def prepare_model(
    model: Annotated[str, typer.Argument(help="'default' or 'tiny'")] = "default",
) -> None:
    """Build a built-in model into the cache (done automatically on first use)."""
    from pdserve.models import resolve_model

    typer.echo(resolve_model(model))


def _register_subcommands() -> None:
    from pdserve.autoscale.cli import planner
    from pdserve.bench.cli import bench_app
    from pdserve.sim.cli import sim_app

    app.add_typer(bench_app, name="bench")
    app.command()(planner)
    app.add_typer(sim_app, name="sim")


_register_subcommands()


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":
    main()
