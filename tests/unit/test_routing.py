"""Routing wiring over real gRPC to fake workers: fresh load through WatchLoad, KV event
sources from WorkerInfo, and subscriptions that follow workers joining and leaving."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
from prometheus_client import CollectorRegistry

from pdserve.config import Role
from pdserve.metrics import RoutingMetrics
from pdserve.router.load_watch import LoadWatcher
from pdserve.router.routing import Routing, event_source
from pdserve.router.workers import WorkerClient, WorkerPool
from pdserve.scheduling_config import SchedulingConfig
from pdserve.v1 import worker_pb2 as pb
from tests.unit.fake_worker import FakeWorker, serve_fake

MODEL = "fake-model"


class LoadStreamingWorker(FakeWorker):
    """Streams whatever ``self.running`` is, every interval."""

    def __init__(self) -> None:
        super().__init__(pb.ROLE_DECODE, MODEL)
        self.running = 0
        self.intervals: list[int] = []

    async def WatchLoad(
        self, request: pb.WatchLoadRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.LoadReport]:
        self.intervals.append(request.interval_ms)
        while True:
            yield pb.LoadReport(running_requests=self.running)
            await asyncio.sleep(request.interval_ms / 1000)


class NamedWorker(FakeWorker):
    def __init__(self, role: int, name: str) -> None:
        super().__init__(role, MODEL)
        self.name = name

    async def GetInfo(
        self, request: pb.GetInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.WorkerInfo:
        info = await super().GetInfo(request, context)
        info.worker_id = self.name
        return info


async def _until(condition: object, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_load_changes_reach_the_router_between_polls() -> None:
    worker = LoadStreamingWorker()
    server, address = await serve_fake(worker)
    # Polls every minute: only the stream can explain a fresh view.
    pool = WorkerPool(MODEL, rpc_timeout_s=2, poll_interval_s=60)
    pool.add([address], Role.DECODE)
    await pool.poll_once()
    watcher = LoadWatcher(pool, interval_ms=20)
    watcher.sync()
    try:
        client = pool.workers[0]
        worker.running = 7
        await _until(lambda: client.load.running_requests == 7, timeout_s=1.0)
        assert worker.intervals == [20]
        pool.remove(address)
        watcher.sync()
        assert not watcher._tasks
    finally:
        await watcher.close()
        await pool.close()
        await server.stop(None)


async def test_workers_without_watch_load_keep_the_polled_view() -> None:
    worker = FakeWorker(pb.ROLE_DECODE, MODEL)  # no WatchLoad: UNIMPLEMENTED
    server, address = await serve_fake(worker)
    pool = WorkerPool(MODEL, rpc_timeout_s=2, poll_interval_s=60)
    pool.add([address], Role.DECODE)
    await pool.poll_once()
    watcher = LoadWatcher(pool)
    watcher.sync()
    try:
        await _until(lambda: address in watcher._unsupported)
        watcher.sync()
        assert not watcher._tasks
    finally:
        await watcher.close()
        await pool.close()
        await server.stop(None)


def _worker(address: str, endpoint: str = "", replay: str = "") -> WorkerClient:
    w = WorkerClient(address, Role.DECODE, channel=None, stub=None)  # type: ignore[arg-type]
    w.info = pb.WorkerInfo(
        worker_id=address,
        model_id=MODEL,
        kv_events_endpoint=endpoint,
        kv_events_replay_endpoint=replay,
        kv_layout=pb.KvHandle(block_size=16, hash_algorithm="vllm-sha256_cbor"),
    )
    return w


def test_event_source_resolves_wildcard_hosts_to_the_workers_address() -> None:
    w = _worker("10.1.2.3:50100", "tcp://*:5606", "tcp://*:5607")
    source = event_source(w)
    assert source is not None
    assert (source.endpoint, source.replay_endpoint) == (
        "tcp://10.1.2.3:5606",
        "tcp://10.1.2.3:5607",
    )
    explicit = event_source(_worker("h:1", "tcp://events.local:9"))
    assert explicit is not None and explicit.endpoint == "tcp://events.local:9"
    assert explicit.replay_endpoint is None
    assert event_source(_worker("h:1")) is None


async def test_routing_subscribes_to_joined_workers_and_drops_leavers() -> None:
    pool = WorkerPool(MODEL, rpc_timeout_s=2, poll_interval_s=60)
    a = _worker("127.0.0.1:1", "tcp://*:1", "tcp://*:2")
    b = _worker("127.0.0.1:3", "tcp://*:3")
    pool.workers = [a, b]
    routing = Routing(SchedulingConfig(), pool, RoutingMetrics(CollectorRegistry()), MODEL)
    routing.loads.sync = lambda: None  # type: ignore[method-assign]  # no gRPC here
    try:
        routing.sync()
        assert routing.hub is not None and set(routing.hub._tasks) == {a.address, b.address}
        hasher = routing.events.hasher
        assert hasher is not None and (hasher.block_size, hasher.algorithm) == (16, "sha256_cbor")
        routing.events.index.store(a.address, [1, 2])
        # a restarts (the pool re-read its identity): its blocks are forgotten.
        fresh = pb.WorkerInfo()
        fresh.CopyFrom(a.info)
        a.info = fresh
        routing.sync()
        assert not routing.events.index.holds(a.address, 1)
        assert a.address in routing.hub._tasks
        pool.workers = [b]
        routing.sync()
        assert set(routing.hub._tasks) == {b.address}
    finally:
        await routing.close()


async def test_http_route_header_and_session_affinity() -> None:
    """The real router app over gRPC to three fake workers (1 prefill, 2 decode)."""
    import httpx

    from pdserve.metrics import RouterMetrics
    from pdserve.models import resolve_model
    from pdserve.router.api.grpc import InferenceServicer
    from pdserve.router.api.http import build_http_app
    from pdserve.router.service import GenerationService
    from pdserve.router.tokenize import PromptTokenizer
    from pdserve.scheduling_config import PolicyConfig
    from pdserve.v1 import common_pb2 as cpb
    from pdserve.v1 import inference_pb2 as ipb
    from pdserve.v1 import inference_pb2_grpc

    fakes = [NamedWorker(pb.ROLE_PREFILL, "p0"), NamedWorker(pb.ROLE_DECODE, "d0")]
    fakes.append(NamedWorker(pb.ROLE_DECODE, "d1"))
    served = [await serve_fake(f) for f in fakes]
    pool = WorkerPool(MODEL, rpc_timeout_s=2, poll_interval_s=60)
    pool.add([served[0][1]], Role.PREFILL)
    pool.add([a for _, a in served[1:]], Role.DECODE)
    await pool.poll_once()
    metrics = RouterMetrics(CollectorRegistry())
    config = SchedulingConfig(decode=PolicyConfig("session"))
    routing = Routing(config, pool, metrics.routing_ctx, MODEL)
    service = GenerationService(MODEL, pool, routing.planner, metrics, default_max_model_len=64)
    tokenizer = PromptTokenizer(str(resolve_model("tiny")))
    app = build_http_app(service, tokenizer, metrics.registry, routing.planner.can_serve, 4096)
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 2}
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://r") as client:
            r = await client.post("/v1/completions", json=body)
            route = r.headers["x-pdserve-route"]
            assert route.startswith("disaggregated; decode=d") and "prefill=p0" in route
            assert route.endswith("reason=always; cached_tokens=0")
            streamed = await client.post("/v1/completions", json={**body, "stream": True})
            assert streamed.headers["x-pdserve-route"].startswith("disaggregated")
            for session in ("alice", "bob", "carol"):
                routes = set()
                for _ in range(4):
                    r = await client.post(
                        "/v1/completions", json=body, headers={"x-session-id": session}
                    )
                    routes.add(r.headers["x-pdserve-route"].split(";")[1])
                assert len(routes) == 1, (session, routes)
                by_user = await client.post("/v1/completions", json={**body, "user": session})
                assert by_user.headers["x-pdserve-route"].split(";")[1] in routes
        # The gRPC API: session from metadata, the decision in trailing metadata.
        grpc_server = grpc.aio.server()
        inference_pb2_grpc.add_InferenceServicer_to_server(
            InferenceServicer(service, tokenizer), grpc_server
        )
        port = grpc_server.add_insecure_port("127.0.0.1:0")
        await grpc_server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            request = ipb.GenerateRequest(
                model=MODEL, prompt="hello", sampling=cpb.SamplingParams(max_tokens=2)
            )
            homes = set()
            for _ in range(3):
                call = stub.Generate(request, metadata=(("x-session-id", "dave"),))
                assert [m.text async for m in call]
                trailing = dict(await call.trailing_metadata())  # type: ignore[arg-type]
                assert trailing["x-pdserve-route"].startswith("disaggregated; decode=d")
                homes.add(trailing["x-pdserve-route"].split(";")[1])
            assert len(homes) == 1
        await grpc_server.stop(None)
        # Both APIs count their requests under the policy in effect (prefill/decode).
        count = metrics.registry.get_sample_value
        labels = {"status": "200", "policy": "kv_aware/session"}
        assert count("pdserve_router_requests_total", {"route": "/v1/completions", **labels}) == 17
        labels = {"route": "grpc/Generate", "status": "OK", "policy": "kv_aware/session"}
        assert count("pdserve_router_requests_total", labels) == 3
    finally:
        await routing.close()
        await pool.close()
        for server, _ in served:
            await server.stop(None)


def test_launcher_gives_every_worker_of_larger_pools_its_own_ports(tmp_path: object) -> None:
    """`pdserve up --prefill 2 --decode 3 --policy kv_aware --disaggregation auto`."""
    from pathlib import Path

    from pdserve.config import ClusterConfig, PoolConfig
    from pdserve.deploy.local.launcher import plan_components

    config = ClusterConfig(
        model="tiny",
        prefill=PoolConfig(2),
        decode=PoolConfig(3),
        policy="kv_aware",
        disaggregation="auto",
    )
    workers, router = plan_components(config, Path("/m"), Path(str(tmp_path)))
    assert [w.name for w in workers] == [
        "prefill-0",
        "prefill-1",
        "decode-0",
        "decode-1",
        "decode-2",
    ]

    def flag(argv: list[str], name: str) -> int:
        return int(argv[argv.index(name) + 1])

    ports = [
        {flag(w.argv, f) for f in ("--port", "--metrics-port", "--kv-port")}
        | {flag(w.argv, "--kv-events-port"), flag(w.argv, "--kv-events-port") + 1}
        for w in workers
    ]
    assert all(len(p) == 5 for p in ports)
    assert len(set().union(*ports)) == 5 * len(workers)  # nothing shared between workers
    # The replay port stays inside the worker's KV range, clear of its NIXL ranks.
    for w in workers:
        assert flag(w.argv, "--kv-events-port") + 1 < flag(w.argv, "--kv-port") + 8
    assert router.argv[router.argv.index("--policy") + 1] == "kv_aware"
    assert router.argv[router.argv.index("--disaggregation") + 1] == "auto"
