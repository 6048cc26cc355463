"""Router process: wires the worker pool, planner and service to the HTTP and gRPC APIs."""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
import uvicorn
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from pdserve.config import DiscoveryMode, Role, RouterConfig, TraceExporter
from pdserve.grpc_options import SERVER_OPTIONS
from pdserve.metrics import RouterMetrics
from pdserve.router.api.grpc import InferenceServicer
from pdserve.router.api.http import build_http_app
from pdserve.router.auth import ApiKeys
from pdserve.router.discovery.base import Discovery
from pdserve.router.discovery.static import StaticDiscovery
from pdserve.router.grpc_guard import router_interceptors
from pdserve.router.planner import Planner
from pdserve.router.routing import Routing
from pdserve.router.service import GenerationService
from pdserve.router.tenancy import CacheSalter
from pdserve.router.timeline import DEFAULT_TIMELINE_RING, TimelineRing
from pdserve.router.tokenize import PromptTokenizer
from pdserve.router.workers import WorkerPool
from pdserve.tracing import SERVICE_ROUTER, Tracing
from pdserve.v1 import inference_pb2, inference_pb2_grpc

log = logging.getLogger(__name__)
INFERENCE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
DEFAULT_MAX_MODEL_LEN = 2048


async def _watch_health(
    pool: WorkerPool, planner: Planner, metrics: RouterMetrics, health: HealthServicer
) -> None:
    """Keep gRPC health and the per-role healthy gauge in step with the pool."""
    serving: bool | None = None
    while True:
        for role in Role:
            metrics.workers_healthy.labels(role.value).set(len(pool.healthy(role)))
        for w in pool.workers:
            metrics.breaker_state.labels(w.address, w.role.value).set(w.breaker.state)
        now = planner.can_serve()
        if now != serving:
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if now
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            await health.set("", status)
            await health.set(INFERENCE_SERVICE, status)
            serving = now
        await asyncio.sleep(pool.poll_interval_s)


def _discovery(config: RouterConfig) -> Discovery:
    if config.discovery.mode is DiscoveryMode.KUBERNETES:
        # Imported here: the kubernetes client is needed only in this mode.
        from pdserve.router.discovery.kubernetes import KubernetesDiscovery

        return KubernetesDiscovery(config.discovery)
    if config.discovery.mode is DiscoveryMode.LAUNCHER:
        from pdserve.router.discovery.launcher import LauncherDiscovery

        return LauncherDiscovery(config.discovery.launcher_url)
    if config.discovery.mode is DiscoveryMode.RAY:
        from pdserve.router.discovery.ray import RayDiscovery, connect_ray

        return RayDiscovery(connect_ray(config.discovery))
    return StaticDiscovery(
        {
            Role.PREFILL: config.prefill_workers,
            Role.DECODE: config.decode_workers,
            Role.BOTH: config.both_workers,
        }
    )


def _tracing(config: RouterConfig) -> tuple[Tracing, TimelineRing | None]:
    """Exported traces per config.tracing; the timeline ring when asked for, or by
    default whenever traces are exported."""
    ring_size = config.timeline_ring
    if ring_size == 0 and config.tracing.exporter is not TraceExporter.NONE:
        ring_size = DEFAULT_TIMELINE_RING
    timelines = TimelineRing(ring_size) if ring_size > 0 else None
    tracing = Tracing.create(config.tracing, SERVICE_ROUTER, [timelines] if timelines else [])
    return tracing, timelines


async def serve(config: RouterConfig) -> None:
    registry = CollectorRegistry()
    tracing, timelines = _tracing(config)
    metrics = RouterMetrics(registry)
    tokenizer = PromptTokenizer(config.model_path)
    pool = WorkerPool(
        config.served_model_name,
        config.worker_rpc_timeout_s,
        config.poll_interval_s,
        health=config.health,
        tls=config.tls,
    )
    discovery = _discovery(config)
    routing = Routing(config.scheduling, pool, metrics.routing_ctx, config.served_model_name)
    planner = routing.planner
    service = GenerationService(
        config.served_model_name,
        pool,
        planner,
        metrics,
        DEFAULT_MAX_MODEL_LEN,
        retry=config.retry,
        admission=config.admission,
        decoder=tokenizer,
        tenancy=CacheSalter(config.auth.tenant_isolation, by_api_key=bool(config.auth.api_keys)),
    )

    keys = ApiKeys(config.auth, metrics)
    grpc_server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=router_interceptors(keys))
    inference_pb2_grpc.add_InferenceServicer_to_server(
        InferenceServicer(service, tokenizer, tracing), grpc_server
    )
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, grpc_server)
    reflection.enable_server_reflection(
        (
            INFERENCE_SERVICE,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        grpc_server,
    )
    grpc_server.add_insecure_port(f"{config.grpc_host}:{config.grpc_port}")

    app = build_http_app(
        service,
        tokenizer,
        registry,
        planner.can_serve,
        config.max_body_bytes,
        tracing,
        timelines,
    )
    if keys.enabled:
        app.middleware("http")(keys.http_middleware())
    http = uvicorn.Server(
        uvicorn.Config(
            app, host=config.http_host, port=config.http_port, log_level="warning", lifespan="off"
        )
    )
    # We own signal handling: stop both servers together.
    http.install_signal_handlers = lambda: None

    discovery_task = asyncio.create_task(discovery.run(pool))
    await asyncio.sleep(0)  # a static list is in the pool after one step: poll it at once
    await pool.poll_once()
    pool.start()
    routing_task = asyncio.create_task(routing.run())
    await grpc_server.start()
    watcher = asyncio.create_task(_watch_health(pool, planner, metrics, health))
    http_task = asyncio.create_task(http.serve())
    log.info(
        "router up: http://%s:%d  grpc %s:%d  workers %d",
        config.http_host,
        config.http_port,
        config.grpc_host,
        config.grpc_port,
        len(pool.workers),
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    done, _ = await asyncio.wait(
        [asyncio.create_task(stop.wait()), http_task, discovery_task],
        return_when=asyncio.FIRST_COMPLETED,
    )
    if http_task in done and http_task.exception() is not None:
        raise RuntimeError(f"HTTP server failed: {http_task.exception()}")
    # Discovery only ends on an error retrying cannot fix (e.g. no credentials).
    discovery_error = discovery_task.exception() if discovery_task in done else None
    if discovery_error is not None:
        log.error("worker discovery failed, stopping: %s", discovery_error)
    # In-flight streams finish: uvicorn waits for open responses, gRPC gets a grace period.
    http.should_exit = True
    await asyncio.gather(http_task, grpc_server.stop(grace=10.0), return_exceptions=True)
    watcher.cancel()
    discovery_task.cancel()
    routing_task.cancel()
    await routing.close()
    await pool.close()
    tracing.shutdown()
    if discovery_error is not None:
        raise RuntimeError(f"worker discovery failed: {discovery_error}") from discovery_error
    log.info("router stopped")
