"""Planning (colocated vs disaggregated), the disaggregation decision and worker choice,
on fake workers."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry

from pdserve.config import Role
from pdserve.errors import ConfigError, NoCapacityError
from pdserve.metrics import RoutingMetrics
from pdserve.router.kv_index.hashing import BlockHasher
from pdserve.router.kv_index.index import PrefixIndex
from pdserve.router.kv_index.lookup import EventPrefixLookup
from pdserve.router.planner import DisaggregationDecider, Mode, Planner
from pdserve.router.scheduling.policy import Pick, PolicyDeps, build_policy, make_policy
from pdserve.router.workers import WorkerClient, WorkerPool
from pdserve.scheduling_config import DisaggregationConfig, DisaggregationMode, PolicyConfig
from pdserve.v1 import worker_pb2 as pb

# The tiny model's layout: 4 layers x 2 KV heads x 32 dims x fp32 = 2 KiB of KV per token.
LAYOUT = pb.KvHandle(
    model_id="m", dtype="float32", block_size=16, num_layers=4, num_kv_heads=2, head_size=32
)


def fake(
    address: str,
    role: Role,
    healthy: bool = True,
    in_flight: int = 0,
    layout: pb.KvHandle = LAYOUT,
) -> WorkerClient:
    w = WorkerClient(address, role, channel=None, stub=None)  # type: ignore[arg-type]
    w.healthy, w.in_flight = healthy, in_flight
    w.info = pb.WorkerInfo(worker_id=address, model_id="m", kv_layout=layout)
    return w


def planner_with(
    *workers: WorkerClient,
    disaggregation: DisaggregationConfig | None = None,
    deps: PolicyDeps | None = None,
    metrics: RoutingMetrics | None = None,
) -> Planner:
    pool = WorkerPool("m", rpc_timeout_s=1, poll_interval_s=1)
    pool.workers = list(workers)
    deps = deps or PolicyDeps(model_id="m", rng=random.Random(0), metrics=metrics)
    return Planner(
        pool,
        build_policy(PolicyConfig("round_robin"), "prefill", deps),
        build_policy(PolicyConfig("least_load"), "decode", deps),
        disaggregation,
        metrics,
    )


def test_disaggregates_when_both_pools_are_healthy() -> None:
    p, d = fake("p", Role.PREFILL), fake("d", Role.DECODE)
    plan = planner_with(p, d).plan([1, 2, 3])
    assert (plan.mode, plan.prefill, plan.decode) == (Mode.DISAGGREGATED, p, d)
    assert plan.route == "disaggregated; decode=d; prefill=p; reason=always; cached_tokens=0"


def test_policy_name_names_both_pools_only_when_they_differ() -> None:
    pool = WorkerPool("m", rpc_timeout_s=1, poll_interval_s=1)
    assert planner_with().policy_name == "round_robin/least_load"
    same = Planner(pool, make_policy("least_load"), make_policy("least_load"))
    assert same.policy_name == "least_load"


def test_colocates_on_decode_when_prefill_pool_is_down() -> None:
    d = fake("d", Role.DECODE)
    plan = planner_with(fake("p", Role.PREFILL, healthy=False), d).plan([1])
    assert (plan.mode, plan.prefill, plan.decode, plan.reason) == (
        Mode.COLOCATED,
        None,
        d,
        "no_prefill",
    )


def test_colocated_workers_serve_alone() -> None:
    b = fake("b", Role.BOTH)
    assert planner_with(b).plan([1]).mode is Mode.COLOCATED


def test_no_capacity_is_a_typed_error() -> None:
    planner = planner_with(fake("p", Role.PREFILL), fake("d", Role.DECODE, healthy=False))
    assert not planner.can_serve()
    with pytest.raises(NoCapacityError):
        planner.plan([1])


def test_excluded_workers_and_colocated_only() -> None:
    p, d1, d2 = fake("p", Role.PREFILL), fake("d1", Role.DECODE), fake("d2", Role.DECODE)
    planner = planner_with(p, d1, d2)
    assert planner.plan([1], exclude={"d1"}).decode is d2
    plan = planner.plan([1], colocated=True)
    assert (plan.mode, plan.reason) == (Mode.COLOCATED, "colocated_only")
    with pytest.raises(NoCapacityError):
        planner.plan([1], exclude={"d1", "d2"})


def test_prefill_must_match_the_decode_workers_kv_layout() -> None:
    other = pb.KvHandle()
    other.CopyFrom(LAYOUT)
    other.block_size = 32
    bad, good, d = (
        fake("bad", Role.PREFILL, layout=other),
        fake("good", Role.PREFILL),
        fake("d", Role.DECODE),
    )
    planner = planner_with(bad, good, d)
    assert {planner.plan([1]).prefill.address for _ in range(4)} == {"good"}  # type: ignore[union-attr]


def test_never_mode_colocates_and_decisions_are_counted() -> None:
    metrics = RoutingMetrics(CollectorRegistry())
    planner = planner_with(
        fake("p", Role.PREFILL),
        fake("d", Role.DECODE),
        disaggregation=DisaggregationConfig(mode=DisaggregationMode.NEVER),
        metrics=metrics,
    )
    assert planner.plan([1]).mode is Mode.COLOCATED
    assert metrics.disaggregation.labels("colocated", "no_prefill")._value.get() == 1
    assert metrics.decisions.labels("decode", "least_load", "no_prefix")._value.get() == 1
    planner.pool.workers = []
    with pytest.raises(NoCapacityError):
        planner.plan([1])
    assert metrics.decisions.labels("decode", "least_load", "no_candidate")._value.get() == 1


# --- the disaggregation decision (auto) ---------------------------------------------


def pick(worker: WorkerClient, cached: int = 0) -> Pick:
    return Pick(worker, 0.0, cached)


AUTO = DisaggregationConfig(
    mode=DisaggregationMode.AUTO,
    min_uncached_tokens=64,
    link_bytes_per_s=1e9,
    prefill_tokens_per_s=1000,
    overhead_s=0.005,
    decode_interference=0.5,
)


def test_short_uncached_prompts_colocate() -> None:
    decider = DisaggregationDecider(AUTO)
    p, d = fake("p", Role.PREFILL), fake("d", Role.DECODE)
    assert decider.decide(63, pick(d), pick(p)).reason == "short_uncached"
    # A long prompt whose prefix the decode worker holds is short once uncached.
    assert decider.decide(1000, pick(d, cached=960), pick(p)).reason == "short_uncached"


def test_idle_decode_worker_prefills_itself() -> None:
    """Nothing to stall on D: moving the KV only adds transfer time and overhead."""
    decider = DisaggregationDecider(AUTO)
    p, d = fake("p", Role.PREFILL), fake("d", Role.DECODE)
    decision = decider.decide(512, pick(d), pick(p))
    assert (decision.disaggregate, decision.reason) == (False, "transfer_cost")
    # 512 tokens x 2 KiB / 1 GB/s = 1.05 ms of transfer, plus 5 ms overhead.
    assert decision.colocated_s == pytest.approx(0.512)
    assert decision.disaggregated_s == pytest.approx(0.512 + 512 * 2048 / 1e9 + 0.005)


def test_busy_decode_worker_disaggregates() -> None:
    decider = DisaggregationDecider(AUTO)
    p, d = fake("p", Role.PREFILL), fake("d", Role.DECODE)
    d.load = pb.LoadReport(running_requests=4)
    decision = decider.decide(512, pick(d), pick(p))
    assert (decision.disaggregate, decision.reason) == (True, "cost_model")
    assert decision.colocated_s == pytest.approx(0.512 * 3)


def test_slow_link_or_queued_prefill_keeps_it_local() -> None:
    p, d = fake("p", Role.PREFILL), fake("d", Role.DECODE)
    d.load = pb.LoadReport(running_requests=4)
    slow = DisaggregationDecider(DisaggregationConfig(**{**AUTO.__dict__, "link_bytes_per_s": 1e6}))
    assert not slow.decide(512, pick(d), pick(p)).disaggregate  # 1 s of transfer
    p.load = pb.LoadReport(waiting_requests=3)
    assert not DisaggregationDecider(AUTO).decide(512, pick(d), pick(p)).disaggregate


def test_prefix_cached_on_prefill_worker_favours_disaggregation() -> None:
    decider = DisaggregationDecider(AUTO)
    p, d = fake("p", Role.PREFILL), fake("d", Role.DECODE)
    assert decider.decide(800, pick(d), pick(p, cached=768)).disaggregate


def test_auto_planner_uses_the_decode_workers_cached_prefix() -> None:
    index = PrefixIndex()
    lookup = EventPrefixLookup(index)
    lookup.use_hasher(BlockHasher(16, "sha256_cbor"))
    prompt = list(range(320))
    hashes = lookup.hasher.block_hashes(prompt)  # type: ignore[union-attr]
    index.store("d2", hashes)
    p, d1, d2 = fake("p", Role.PREFILL), fake("d1", Role.DECODE), fake("d2", Role.DECODE)
    d1.load = d2.load = pb.LoadReport(running_requests=4)
    deps = PolicyDeps(model_id="m", events=lookup, rng=random.Random(0))
    pool = WorkerPool("m", rpc_timeout_s=1, poll_interval_s=1)
    pool.workers = [p, d1, d2]
    planner = Planner(
        pool,
        build_policy(PolicyConfig("kv_aware"), "prefill", deps),
        build_policy(PolicyConfig("kv_aware"), "decode", deps),
        AUTO,
    )
    plan = planner.plan(prompt)
    assert (plan.mode, plan.decode, plan.cached_tokens) == (Mode.COLOCATED, d2, 320)
    # Another prompt of the same length, cached nowhere, on busy decode workers: split.
    assert planner.plan(list(range(1000, 1320))).mode is Mode.DISAGGREGATED


def test_unknown_policy() -> None:
    with pytest.raises(ConfigError, match="round_robin"):
        make_policy("psychic")
