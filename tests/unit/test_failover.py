"""Circuit breaker, retries and migration over real gRPC to toy workers with faults."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import grpc
import pytest
from prometheus_client import CollectorRegistry

from pdserve.config import HealthConfig, RetryConfig, Role
from pdserve.errors import NoCapacityError, WorkerError
from pdserve.metrics import RouterMetrics
from pdserve.router.health import BreakerState, CircuitBreaker
from pdserve.router.planner import Planner
from pdserve.router.scheduling.policy import make_policy
from pdserve.router.service import Delta, GenerateCall, GenerationService
from pdserve.router.workers import WorkerPool
from pdserve.v1 import common_pb2 as cpb
from pdserve.v1 import worker_pb2 as pb
from tests.unit.fake_lm import MAX_MODEL_LEN, ToyDecoder, ToyWorker, continuation, serve_toy

MODEL = "toy"
PROMPT = [5, 6, 7, 8]
FAST_HEALTH = HealthConfig(failure_threshold=2, cooldown_s=0.3, check_timeout_s=0.2)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_probes_and_closes() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(HealthConfig(failure_threshold=3, cooldown_s=5), "w", clock)
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED and breaker.allows_traffic()
    breaker.record_success()  # a success resets the consecutive count
    for _ in range(2):
        breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN and not breaker.allows_traffic()
    clock.now += 1
    breaker.record_success()  # during the cooldown an answer proves little
    assert breaker.state is BreakerState.OPEN
    clock.now += 4
    assert breaker.state is BreakerState.HALF_OPEN and not breaker.allows_traffic()
    breaker.record_failure()  # the probe failed: open for another cooldown
    assert breaker.state is BreakerState.OPEN
    clock.now += 5
    breaker.record_success()  # the probe succeeded
    assert breaker.state is BreakerState.CLOSED and breaker.allows_traffic()


def test_breaker_trips_watched_calls_only_while_watched() -> None:
    breaker = CircuitBreaker(HealthConfig(failure_threshold=1), "w")
    cancelled: list[str] = []
    first = breaker.watch(lambda: cancelled.append("first"))
    second = breaker.watch(lambda: cancelled.append("second"))
    second.close()
    breaker.record_failure()
    assert cancelled == ["first"] and first.fired and not second.fired


@dataclass
class Cluster:
    service: GenerationService
    pool: WorkerPool
    metrics: RouterMetrics
    prefill: list[ToyWorker]
    decode: list[ToyWorker]
    servers: dict[int, grpc.aio.Server] = field(default_factory=dict)  # id(worker) -> server

    async def kill(self, worker: ToyWorker) -> None:
        await self.servers[id(worker)].stop(None)


MakeCluster = Callable[..., Awaitable[Cluster]]


@pytest.fixture
async def make_cluster() -> AsyncIterator[MakeCluster]:
    clusters: list[Cluster] = []

    async def make(prefills: int, decodes: int, retry: RetryConfig | None = None) -> Cluster:
        pool = WorkerPool(MODEL, rpc_timeout_s=2, poll_interval_s=0.1, health=FAST_HEALTH)
        workers = {
            Role.PREFILL: [ToyWorker(pb.ROLE_PREFILL, MODEL) for _ in range(prefills)],
            Role.DECODE: [ToyWorker(pb.ROLE_DECODE, MODEL) for _ in range(decodes)],
        }
        servers = {}
        for role, group in workers.items():
            for w in group:
                server, address = await serve_toy(w)
                servers[id(w)] = server
                pool.add([address], role)
        await pool.poll_once()
        metrics = RouterMetrics(CollectorRegistry())
        planner = Planner(pool, make_policy("round_robin"), make_policy("least_load"))
        service = GenerationService(
            MODEL,
            pool,
            planner,
            metrics,
            MAX_MODEL_LEN,
            retry=retry or RetryConfig(backoff_s=0.001),
            decoder=ToyDecoder(),
        )
        cluster = Cluster(
            service, pool, metrics, workers[Role.PREFILL], workers[Role.DECODE], servers
        )
        clusters.append(cluster)
        return cluster

    yield make
    for c in clusters:
        await c.pool.close()
        for server in c.servers.values():
            await server.stop(None)


def call(max_tokens: int, request_id: str = "r", stop: list[str] | None = None) -> GenerateCall:
    params = cpb.SamplingParams(max_tokens=max_tokens, temperature=0, stop=stop or [])
    return GenerateCall(request_id, list(PROMPT), params, time.monotonic())


async def collect(service: GenerationService, c: GenerateCall) -> list[Delta]:
    return [d async for d in service.generate(c)]


def sample(metrics: RouterMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return value or 0.0


def check_complete(deltas: list[Delta], n: int) -> None:
    """Exactly the undisturbed stream: tokens, text, one finish, whole-request usage."""
    expected = continuation(PROMPT, n)
    assert [t for d in deltas for t in d.token_ids] == expected
    assert "".join(d.text for d in deltas) == ToyDecoder().decode(expected)
    assert [d.finish_reason for d in deltas if d.finish_reason] == ["length"]
    usage = deltas[-1].usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(PROMPT), n)


async def test_failed_prefill_is_retried_on_another_prefill_worker(
    make_cluster: MakeCluster,
) -> None:
    c = await make_cluster(2, 1)
    c.prefill[0].fail_with = grpc.StatusCode.UNAVAILABLE
    c.prefill[1].fail_with = None
    for i in range(2):  # round robin: one of the two requests starts on the bad worker
        check_complete(await collect(c.service, call(5, f"r{i}")), 5)
    # Every attempt on the bad worker was retried once, on the good one.
    failed = len(c.prefill[0].requests)
    assert failed >= 1 and len(c.prefill[1].requests) == 2
    labels = {"stage": "prefill", "target": "other_worker"}
    assert sample(c.metrics, "pdserve_router_retries_total", **labels) == failed
    decode_stages = [r.stage for r in c.decode[0].requests]
    assert decode_stages == [pb.STAGE_DECODE, pb.STAGE_DECODE]  # both stayed disaggregated


async def test_dead_decode_before_first_token_retries_on_another_decode(
    make_cluster: MakeCluster,
) -> None:
    c = await make_cluster(1, 2)
    await c.kill(c.decode[0])
    # The pool has not noticed (no poll since): picks may land on the dead worker until
    # its breaker opens from the failed requests themselves.
    labels = {"stage": "decode", "target": "other_worker"}
    for i in range(10):
        check_complete(await collect(c.service, call(4, f"r{i}")), 4)
        if sample(c.metrics, "pdserve_router_retries_total", **labels) >= 1:
            break
    assert sample(c.metrics, "pdserve_router_retries_total", **labels) >= 1
    assert len(c.decode[1].requests) == i + 1


async def test_unavailable_without_a_worker_verdict_is_a_dead_decode_worker(
    make_cluster: MakeCluster,
) -> None:
    """Right after a SIGKILL the channel may still read READY while calls fail with
    UNAVAILABLE: the worker is dead, not blaming its KV source. The request retries on the
    other decode worker and is never sent back to the failed one."""
    c = await make_cluster(1, 2)
    c.decode[0].fail_with = grpc.StatusCode.UNAVAILABLE
    for i in range(4):  # round robin: some requests start on the failing worker
        check_complete(await collect(c.service, call(4, f"r{i}")), 4)
    failed = c.decode[0].requests
    assert failed and all(r.stage == pb.STAGE_DECODE for r in failed)
    assert (
        sample(c.metrics, "pdserve_router_retries_total", stage="decode", target="colocated") == 0
    )


async def test_a_live_decode_worker_s_verdict_blames_the_kv_source_first(
    make_cluster: MakeCluster,
) -> None:
    """A live decode worker that reports a failed KV pull keeps its place once; the
    prefill worker (the likelier culprit) is left out: with no other prefill worker, the
    request falls back colocated."""
    c = await make_cluster(1, 1)
    c.decode[0].fail_with = grpc.StatusCode.UNAVAILABLE
    c.decode[0].fail_as_verdict = True
    stream = collect(c.service, call(4))
    with pytest.raises(NoCapacityError):
        await stream
    stages = [r.stage for r in c.decode[0].requests]
    assert stages == [pb.STAGE_DECODE, pb.STAGE_FULL]  # kept once, colocated last resort


async def test_failed_prefill_falls_back_colocated_as_last_resort(
    make_cluster: MakeCluster,
) -> None:
    c = await make_cluster(1, 1, RetryConfig(budget=0))
    c.prefill[0].fail_with = grpc.StatusCode.INTERNAL
    check_complete(await collect(c.service, call(3)), 3)
    assert [r.stage for r in c.decode[0].requests] == [pb.STAGE_FULL]
    assert c.decode[0].requests[0].request_id == "r-colocated"
    assert (
        sample(c.metrics, "pdserve_router_retries_total", stage="prefill", target="colocated") == 1
    )


async def test_decode_crash_mid_stream_migrates_with_exact_tokens(
    make_cluster: MakeCluster,
) -> None:
    c = await make_cluster(1, 2)
    c.decode[0].die_after = 3
    c.decode[1].die_after = 3  # whichever is picked first dies; the second must not
    deltas: list[Delta] = []
    stream = c.service.generate(call(10))
    async for d in stream:
        deltas.append(d)
        if len(deltas) == 1:
            # The first token is out: make the other worker healthy for the migration.
            first = c.decode[0] if c.decode[0].requests else c.decode[1]
            other = c.decode[1] if first is c.decode[0] else c.decode[0]
            other.die_after = None
    check_complete(deltas, 10)
    moved = other.requests[-1]
    assert moved.stage == pb.STAGE_FULL
    assert list(moved.prompt_token_ids) == PROMPT + continuation(PROMPT, 3)
    assert moved.sampling.max_tokens == 7
    assert sample(c.metrics, "pdserve_router_migrations_total", outcome="started") == 1


async def test_migration_applies_stop_strings_across_the_boundary(
    make_cluster: MakeCluster,
) -> None:
    """The stop string starts in text the first worker held back and ends in the second
    worker's tokens; neither worker alone sees it. The client gets what an undisturbed
    run gives."""
    c = await make_cluster(0, 2)
    tokens = continuation(PROMPT, 10)
    stop = ToyDecoder().decode(tokens[2:4])  # " t11 t12"
    undisturbed = await collect(c.service, call(10, "ref", stop=[stop]))
    assert "".join(d.text for d in undisturbed) == ToyDecoder().decode(tokens[:2])
    for w in c.decode:
        w.die_after = 3
    deltas: list[Delta] = []
    async for d in c.service.generate(call(10, stop=[stop])):
        deltas.append(d)
        if len(deltas) == 1:
            for w in c.decode:
                if len(w.requests) == 1:  # the one not serving this stream
                    w.die_after = None
    text = "".join(d.text for d in deltas)
    assert text == "".join(d.text for d in undisturbed)
    assert [t for d in deltas for t in d.token_ids] == tokens[:4]
    assert deltas[-1].finish_reason == "stop" == undisturbed[-1].finish_reason
    usage, ref_usage = deltas[-1].usage, undisturbed[-1].usage
    assert usage is not None and ref_usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(PROMPT), 4)
    assert usage.completion_tokens == ref_usage.completion_tokens


async def test_hung_decode_worker_opens_breaker_and_stream_migrates(
    make_cluster: MakeCluster,
) -> None:
    """A SIGSTOPped worker: its stream stalls and its health checks miss their deadline.
    The breaker opens within threshold x deadline, trips the stalled stream, and the
    request continues elsewhere; when the worker answers again the breaker closes."""
    c = await make_cluster(0, 2)
    for w in c.decode:
        w.hang_after = 2
    stream = c.service.generate(call(6))
    deltas = [await anext(stream)]
    hung = c.decode[0] if c.decode[0].requests else c.decode[1]
    healthy = c.decode[1] if hung is c.decode[0] else c.decode[0]
    healthy.hang_after = None
    hung.hang_health = True
    hung_client = next(w for w in c.pool.workers if w.in_flight)
    c.pool.start()
    started = time.monotonic()
    rest = [d async for d in stream]
    elapsed = time.monotonic() - started
    check_complete(deltas + rest, 6)
    bound = FAST_HEALTH.failure_threshold * (FAST_HEALTH.check_timeout_s + 0.1) + 1.0
    assert elapsed < bound, f"breaker took {elapsed:.2f} s (bound {bound:.2f} s)"
    assert hung_client.breaker.state is not BreakerState.CLOSED
    assert hung_client not in c.pool.healthy(Role.DECODE)
    hung.hang_health = False
    await asyncio.sleep(FAST_HEALTH.cooldown_s + 0.5)
    assert hung_client.breaker.state is BreakerState.CLOSED
    assert hung_client in c.pool.healthy(Role.DECODE)


async def test_no_worker_left_fails_cleanly(make_cluster: MakeCluster) -> None:
    c = await make_cluster(0, 1)
    c.decode[0].die_after = 2
    got: list[Delta] = []
    with pytest.raises((WorkerError, NoCapacityError)):
        async for d in c.service.generate(call(5)):
            got.append(d)
    assert [t for d in got for t in d.token_ids] == continuation(PROMPT, 2)  # no duplicates


async def test_client_cancellation_is_not_a_worker_failure(make_cluster: MakeCluster) -> None:
    c = await make_cluster(0, 1)
    c.decode[0].token_delay_s = 0.05

    async def consume() -> None:
        async for _ in c.service.generate(call(50)):
            pass

    task = asyncio.create_task(consume())
    await c.decode[0].started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(500):  # the cancellation crosses a real gRPC stream: wait for it
        if c.decode[0].cancelled:
            break
        await asyncio.sleep(0.01)
    assert c.decode[0].cancelled == 1  # the worker saw the cancellation
    assert len(c.decode[0].requests) == 1  # and nothing was retried
    assert c.pool.workers[0].breaker.state is BreakerState.CLOSED
    assert c.pool.workers[0].in_flight == 0 and c.service.admission.in_flight == 0


async def test_a_decode_worker_that_leaves_after_planning_is_not_an_error(
    make_cluster: MakeCluster,
) -> None:
    """Scale-in race: the request was planned onto a decode worker that left the pool (its
    channel closed) while the prefill ran; the decode goes to the other worker."""
    c = await make_cluster(1, 2)
    c.prefill[0].token_delay_s = 0.3
    task = asyncio.create_task(collect(c.service, call(4)))
    planned = None
    for _ in range(200):
        planned = next((w for w in c.pool.workers if w.role is Role.DECODE and w.in_flight), None)
        if planned is not None:
            break
        await asyncio.sleep(0.005)
    assert planned is not None and c.prefill[0].in_flight == 1  # still prefilling
    c.pool.remove(planned.address, Role.DECODE)
    check_complete(await task, 4)
    served = [len(w.requests) for w in c.decode]
    assert sorted(served) == [0, 1]  # nothing reached the worker that left
    labels = {"stage": "decode", "target": "other_worker"}
    assert sample(c.metrics, "pdserve_router_retries_total", **labels) == 1
