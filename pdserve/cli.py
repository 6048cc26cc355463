"""The ``pdserve`` command line."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Annotated

import typer

from pdserve.cli_options import (
    LOG_FORMAT_ENV,
    DisaggregationOption,
    GrpcPortOption,
    HttpPortOption,
    KvSharedMemoryOption,
    KvTransportOption,
    LogFormatOption,
    ModelOption,
    OtlpEndpointOption,
    PolicyOption,
    ServedModelNameOption,
    TlsCaOption,
    TlsCertOption,
    TlsKeyOption,
    TlsServerNameOption,
    configure_logging,
    served_name,
    tls_config,
    tracing_config,
)
from pdserve.config import (
    ClusterConfig,
    EngineConfig,
    PoolConfig,
    RayConfig,
    Role,
    WorkerConfig,
)
from pdserve.errors import ConfigError
from pdserve.models import DEFAULT_MODEL

app = typer.Typer(
    help="pdserve: disaggregated prefill/decode LLM serving on vLLM.", no_args_is_help=True
)


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
    kv_shared_memory: KvSharedMemoryOption = ClusterConfig.kv_shared_memory,
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
        kv_shared_memory=kv_shared_memory,
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
    kv_shared_memory: KvSharedMemoryOption = WorkerConfig.kv_shared_memory,
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

    configure_logging(log_level, log_format)
    tls = tls_config(tls_cert, tls_key, tls_ca, tls_server_name)
    path = resolve_model(model)
    try:
        engine = EngineConfig(
            model_path=str(path),
            served_model_name=served_name(path, served_model_name),
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
        kv_shared_memory=kv_shared_memory,
        cpu_bind=cpu_bind,
        tracing=tracing_config(otlp_endpoint),
        kv_events_port=kv_events_port,
        tls=tls,
        health_port=health_port,
    )
    asyncio.run(serve(config))


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
    from pdserve.router.cli import router
    from pdserve.sim.cli import sim_app

    app.command()(router)
    app.add_typer(bench_app, name="bench")
    app.command()(planner)
    app.add_typer(sim_app, name="sim")


_register_subcommands()


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":
    main()
