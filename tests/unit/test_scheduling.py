"""The scheduling pipeline on fake workers: every filter, scorer and picker, the named
policies and their configuration."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from prometheus_client import CollectorRegistry

from pdserve.config import Role
from pdserve.errors import ConfigError
from pdserve.metrics import RoutingMetrics
from pdserve.router.kv_index.hashing import BlockHasher
from pdserve.router.kv_index.index import PrefixIndex
from pdserve.router.kv_index.lookup import EventPrefixLookup, RoutedPrefixLookup
from pdserve.router.scheduling.cost import TransferCostModel, kv_bytes_per_token
from pdserve.router.scheduling.filters import (
    HealthyFilter,
    KvCompatFilter,
    ModelFilter,
    RoleFilter,
)
from pdserve.router.scheduling.pickers import MaxScorePicker, RandomPicker, RoundRobinPicker
from pdserve.router.scheduling.policy import PolicyDeps, build_policy
from pdserve.router.scheduling.request import SchedulingRequest
from pdserve.router.scheduling.scorers import (
    KvUsageScorer,
    PrefixScorer,
    QueueScorer,
    RunningScorer,
    SessionAffinityScorer,
    TransferCostScorer,
)
from pdserve.scheduling_config import PolicyConfig, SchedulingConfig
from pdserve.v1 import worker_pb2 as pb
from tests.unit.test_planner import LAYOUT, fake

PROMPT = list(range(100, 164))  # 4 blocks of 16


def events_lookup() -> tuple[EventPrefixLookup, list[int]]:
    lookup = EventPrefixLookup(PrefixIndex())
    hasher = BlockHasher(16, "sha256_cbor")
    lookup.use_hasher(hasher)
    return lookup, hasher.block_hashes(PROMPT)


# --- filters ----------------------------------------------------------------------


def test_filters() -> None:
    a, b = fake("a", Role.DECODE), fake("b", Role.PREFILL)
    c = fake("c", Role.DECODE, healthy=False)
    request = SchedulingRequest(PROMPT, roles=(Role.DECODE,))
    assert HealthyFilter().filter([a, b, c], request) == [a, b]
    assert RoleFilter().filter([a, b, c], request) == [a, c]
    b.info.model_id = "other"  # type: ignore[union-attr]
    assert ModelFilter("m").filter([a, b], request) == [a]


def test_kv_compat_filter_checks_against_the_peer() -> None:
    odd = pb.KvHandle()
    odd.CopyFrom(LAYOUT)
    odd.dtype = "bfloat16"
    same, different = fake("same", Role.PREFILL), fake("diff", Role.PREFILL, layout=odd)
    peer = fake("d", Role.DECODE)
    request = SchedulingRequest(PROMPT, roles=(Role.PREFILL,), peer=peer)
    assert KvCompatFilter().filter([same, different], request) == [same]
    # Different parallel shapes are the transport's business, not a filter's.
    tp2 = pb.KvHandle()
    tp2.CopyFrom(LAYOUT)
    tp2.tensor_parallel_size = 2
    assert KvCompatFilter().filter([fake("tp2", Role.PREFILL, layout=tp2)], request)
    # No peer yet: everything passes.
    assert KvCompatFilter().filter([same, different], SchedulingRequest(PROMPT)) == [
        same,
        different,
    ]


# --- scorers ----------------------------------------------------------------------


def test_prefix_scorer_is_the_cached_share_of_the_prompt() -> None:
    lookup, hashes = events_lookup()
    lookup.index.store("a", hashes[:2])
    lookup.index.store("b", hashes)
    a, b, c = (fake(x, Role.DECODE) for x in "abc")
    scores = PrefixScorer(lookup).score([a, b, c], SchedulingRequest(PROMPT))
    assert scores == [0.5, 1.0, 0.0]


def test_prefix_scorer_in_approximate_mode_learns_from_picks() -> None:
    lookup = RoutedPrefixLookup(block_size=16)
    scorer = PrefixScorer(lookup)
    a, b = fake("a", Role.DECODE), fake("b", Role.DECODE)
    request = SchedulingRequest(PROMPT)
    assert scorer.score([a, b], request) == [0.0, 0.0]
    scorer.picked(b, request)
    assert scorer.score([a, b], SchedulingRequest(PROMPT)) == [0.0, 1.0]


def test_load_scorers_are_in_unit_range_and_monotonic() -> None:
    workers = [fake(str(i), Role.DECODE) for i in range(4)]
    for i, w in enumerate(workers):
        w.load = pb.LoadReport(running_requests=4 * i, waiting_requests=2 * i, kv_cache_usage=i / 3)
    request = SchedulingRequest(PROMPT)
    for scorer in (QueueScorer(), RunningScorer(), KvUsageScorer()):
        scores = scorer.score(workers, request)
        assert scores[0] == 1.0 and all(0 <= s <= 1 for s in scores), scorer.name
        assert scores == sorted(scores, reverse=True), scorer.name
    assert QueueScorer(half=2).score(workers[1:2], request) == [0.5]
    assert KvUsageScorer().score(workers[3:], request) == [pytest.approx(0.0)]


def test_running_scorer_uses_the_routers_fresher_count() -> None:
    reported, routed = fake("a", Role.DECODE), fake("b", Role.DECODE, in_flight=8)
    scores = RunningScorer(half=8).score([reported, routed], SchedulingRequest(PROMPT))
    assert scores == [1.0, 0.5]


def test_transfer_cost_scorer_prefers_workers_needing_less_kv() -> None:
    lookup, hashes = events_lookup()
    lookup.index.store("b", hashes)
    a, b = fake("a", Role.DECODE), fake("b", Role.DECODE)
    assert kv_bytes_per_token(a) == 2 * 4 * 2 * 32 * 4
    cost = TransferCostModel(link_bytes_per_s=64 * 2048 / 0.05)  # whole prompt: 50 ms
    scores = TransferCostScorer(lookup, cost, half_s=0.05).score([a, b], SchedulingRequest(PROMPT))
    assert scores == [pytest.approx(0.5), 1.0]


def test_session_affinity_is_stable_and_spreads_sessions() -> None:
    workers = [fake(f"w{i}", Role.DECODE) for i in range(4)]
    scorer = SessionAffinityScorer()

    def home(session: str, candidates: list) -> str:  # type: ignore[type-arg]
        scores = scorer.score(candidates, SchedulingRequest(PROMPT, session_key=session))
        assert sorted(scores) == [0.0] * (len(candidates) - 1) + [1.0]
        return str(candidates[scores.index(1.0)].address)

    homes = {s: home(s, workers) for s in (f"user-{i}" for i in range(40))}
    assert len(set(homes.values())) == 4
    # A worker leaving moves only its own sessions.
    remaining = workers[1:]
    for session, address in homes.items():
        if address != "w0":
            assert home(session, remaining) == address
    assert scorer.score(workers, SchedulingRequest(PROMPT)) == [0.5] * 4


# --- pickers ----------------------------------------------------------------------


def test_max_score_picker_breaks_ties_at_random() -> None:
    picker = MaxScorePicker(rng=random.Random(1))
    assert picker.pick([0.1, 0.9, 0.3]) == 1
    chosen = Counter(picker.pick([1.0, 0.2, 1.0]) for _ in range(200))
    assert set(chosen) == {0, 2} and min(chosen.values()) > 60


def test_softmax_temperature_prefers_but_spreads() -> None:
    picker = MaxScorePicker(temperature=0.5, rng=random.Random(2))
    chosen = Counter(picker.pick([1.0, 0.0]) for _ in range(2000))
    # P(first) = 1 / (1 + e^-2) = 0.88
    assert 0.85 < chosen[0] / 2000 < 0.91


def test_round_robin_and_random_pickers() -> None:
    rr = RoundRobinPicker()
    assert [rr.pick([0, 0, 0]) for _ in range(4)] == [0, 1, 2, 0]
    rnd = RandomPicker(random.Random(3))
    assert set(rnd.pick([0, 0, 0]) for _ in range(100)) == {0, 1, 2}


# --- named policies -----------------------------------------------------------------


def deps_with(lookup: EventPrefixLookup | None = None) -> PolicyDeps:
    return PolicyDeps(
        model_id="m",
        events=lookup,
        approximate=RoutedPrefixLookup(block_size=16),
        metrics=RoutingMetrics(CollectorRegistry()),
        rng=random.Random(0),
    )


def test_kv_aware_sends_a_prompt_to_its_holder_until_it_is_overloaded() -> None:
    lookup, hashes = events_lookup()
    lookup.index.store("b", hashes)
    deps = deps_with(lookup)
    policy = build_policy(PolicyConfig("kv_aware"), "decode", deps)
    a, b = fake("a", Role.DECODE), fake("b", Role.DECODE)
    pick = policy.pick([a, b], SchedulingRequest(PROMPT))
    assert (pick.worker, pick.cached_tokens) == (b, 64)
    b.load = pb.LoadReport(running_requests=40, waiting_requests=20, kv_cache_usage=0.9)
    assert policy.pick([a, b], SchedulingRequest(PROMPT)).worker is a


def test_least_load_and_round_robin_policies() -> None:
    deps = deps_with()
    a, b = fake("a", Role.DECODE), fake("b", Role.DECODE, in_flight=2)
    least = build_policy(PolicyConfig("least_load"), "decode", deps)
    assert least.pick([b, a], SchedulingRequest(PROMPT)).worker is a
    b.in_flight, a.load = 0, pb.LoadReport(running_requests=5)
    assert least.pick([a, b], SchedulingRequest(PROMPT)).worker is b
    rr = build_policy(PolicyConfig("round_robin"), "decode", deps)
    picks = [rr.pick([a, b], SchedulingRequest(PROMPT)).worker.address for _ in range(4)]
    assert picks == ["a", "b", "a", "b"]


def test_prefix_policy_keeps_groups_together_without_events() -> None:
    deps = deps_with()
    policy = build_policy(PolicyConfig("prefix"), "decode", deps)
    workers = [fake(f"w{i}", Role.DECODE) for i in range(3)]
    homes: dict[int, set[str]] = {}
    for i in range(30):
        group = i % 3
        prompt = [group] * 48 + [1000 + i] * 8  # 3 shared blocks, a private tail
        request = SchedulingRequest(prompt)
        pick = policy.pick(workers, request)
        policy.commit(pick, request)
        homes.setdefault(group, set()).add(pick.worker.address)
    assert all(len(h) == 1 for h in homes.values())


def test_session_policy_follows_the_session() -> None:
    policy = build_policy(PolicyConfig("session"), "decode", deps_with())
    workers = [fake(f"w{i}", Role.DECODE) for i in range(4)]
    first = policy.pick(workers, SchedulingRequest(PROMPT, session_key="alice")).worker
    for _ in range(5):
        assert policy.pick(workers, SchedulingRequest(PROMPT, session_key="alice")).worker is first


def test_commit_counts_decisions_and_prefix_hits() -> None:
    lookup, hashes = events_lookup()
    lookup.index.store("a", hashes[:3])
    deps = deps_with(lookup)
    policy = build_policy(PolicyConfig("kv_aware"), "decode", deps)
    request = SchedulingRequest(PROMPT)
    policy.commit(policy.pick([fake("a", Role.DECODE)], request), request)
    m = deps.metrics
    assert m is not None
    assert m.decisions.labels("decode", "kv_aware", "prefix_hit")._value.get() == 1
    assert m.prefix_tokens.labels("decode", "hit")._value.get() == 48
    assert m.prefix_tokens.labels("decode", "miss")._value.get() == 16
    assert m.prefix_requests.labels("decode", "hit")._value.get() == 1


def test_weights_override_and_bad_configs() -> None:
    deps = deps_with(events_lookup()[0])
    policy = build_policy(PolicyConfig("kv_aware", {"prefix": 0, "session": 2}), "decode", deps)
    assert sorted(s.name for s, _ in policy.scorers) == ["kv_usage", "queue", "running", "session"]
    with pytest.raises(ConfigError, match="unknown scorers"):
        build_policy(PolicyConfig("kv_aware", {"vibes": 1}), "decode", deps)
    with pytest.raises(ConfigError, match="prefix index"):
        build_policy(PolicyConfig("kv_aware"), "decode", PolicyDeps(model_id="m"))


def test_scheduling_config_from_yaml_section() -> None:
    config = SchedulingConfig.from_dict(
        {
            "prefill": "prefix",
            "decode": {"policy": "kv_aware", "weights": {"prefix": 3}, "temperature": 0.1},
            "disaggregation": {"mode": "auto", "minUncachedTokens": 128},
        }
    )
    assert config.prefill == PolicyConfig("prefix")
    assert config.decode == PolicyConfig("kv_aware", {"prefix": 3}, 0.1)
    assert (config.disaggregation.mode, config.disaggregation.min_uncached_tokens) == (
        "auto",
        128,
    )
    for bad in (
        {"decode": {"policy": "kv_aware", "weights": {"prefix": -1}}},
        {"disaggregation": {"mode": "sometimes"}},
        {"disaggregation": {"linkBytesPerS": 0}},
        {"unknown": 1},
    ):
        with pytest.raises(ConfigError):
            SchedulingConfig.from_dict(bad)


def test_scheduling_benchmark_runs_on_a_small_pool() -> None:
    from pdserve.bench.scheduling import build_parser, run

    argv = "--workers 20 --requests 120 --prefixes 4 --holders 2 --noise-blocks 10"
    result = run(build_parser().parse_args([*argv.split(), "--prefix-tokens", "256"]))
    assert (result["workers"], result["requests"]) == (20, 120)
    assert result["index_blocks"] == 4 * 16 + 20 * 10
    assert set(result["plan_ms"]) == set(result["plan_cpu_ms"]) == {50, 90, 99}
