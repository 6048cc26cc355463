"""Worker process: a vLLM engine behind the internal gRPC Worker API, plus /metrics."""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from prometheus_client import REGISTRY

from pdserve.config import KvTransport as KvTransportName
from pdserve.config import WorkerConfig
from pdserve.grpc_options import SERVER_OPTIONS
from pdserve.kv_transfer.grpc_metrics import KvTransferCollector
from pdserve.kv_transfer.registry import transport_for
from pdserve.metrics import WorkerMetrics, serve_metrics
from pdserve.tls import add_port
from pdserve.tracing import SERVICE_BY_ROLE, Tracing
from pdserve.v1 import worker_pb2_grpc
from pdserve.worker.engine import Engine
from pdserve.worker.servicer import WorkerServicer

log = logging.getLogger(__name__)


async def _serve_health_only(
    config: WorkerConfig, health: HealthServicer
) -> grpc.aio.Server | None:
    """The health service alone, in plaintext, on ``health_port`` (for probes that cannot
    present a client certificate); it shows the same status as the Worker API's port."""
    if config.health_port is None:
        return None
    server = grpc.aio.server(options=SERVER_OPTIONS)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if server.add_insecure_port(f"{config.host}:{config.health_port}") == 0:
        raise OSError(f"worker cannot bind its health port {config.host}:{config.health_port}")
    await server.start()
    return server


async def serve(config: WorkerConfig) -> None:
    transport = transport_for(
        config.kv_transport.value,
        config.kv_lease_s,
        host=config.host,
        port=config.kv_port,
        tls=config.tls,
        shared_memory=config.kv_shared_memory,
    )
    engine = Engine(config, transport)
    log.info("worker %s (%s): starting the vLLM engine", config.worker_id, config.role.value)
    engine.start()
    # vLLM registers its engine metrics on prometheus_client's process registry; ours
    # join them there so one /metrics endpoint shows both.
    metrics = WorkerMetrics(REGISTRY, config.role.value)
    if config.kv_transport is KvTransportName.GRPC:
        ec = config.engine
        REGISTRY.register(
            KvTransferCollector(
                config.role.value,
                config.host,
                config.kv_port,
                ec.tensor_parallel_size * ec.pipeline_parallel_size,
                config.tls,
            )
        )
    serve_metrics(config.host, config.metrics_port, REGISTRY, role=config.role.value)

    tracing = Tracing.create(config.tracing, SERVICE_BY_ROLE[config.role.value])
    servicer = WorkerServicer(config, engine, metrics, tracing)
    health = HealthServicer()
    server = grpc.aio.server(options=SERVER_OPTIONS)
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if add_port(server, f"{config.host}:{config.port}", config.tls) == 0:
        raise OSError(f"worker cannot bind {config.host}:{config.port}")
    await server.start()
    probe_server = await _serve_health_only(config, health)
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "worker %s ready: grpc %s:%d, metrics :%d",
        config.worker_id,
        config.host,
        config.port,
        config.metrics_port,
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

    # Drain: refuse new work, let in-flight requests finish within the deadline.
    servicer.draining = True
    await health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    try:
        await asyncio.wait_for(servicer.idle.wait(), config.drain_timeout_s)
    except TimeoutError:
        log.warning("drain deadline passed with %d requests in flight", servicer.in_flight)
    await server.stop(grace=1.0)
    if probe_server is not None:
        await probe_server.stop(grace=None)
    engine.shutdown()
    tracing.shutdown()
    log.info("worker %s stopped", config.worker_id)
