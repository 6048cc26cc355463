"""Metric math on synthetic timings with known answers, and the goodput search."""

from __future__ import annotations

import random

import numpy as np
import pytest

from pdserve.bench.arrival import ArrivalKind, ArrivalSpec
from pdserve.bench.client import RequestResult
from pdserve.bench.metrics import (
    Slo,
    Stats,
    compute_metrics,
    max_rate_meeting_slo,
    parse_duration,
    percentile,
    search_max_rate,
)
from pdserve.bench.runner import PhaseResult, TargetResult
from pdserve.errors import ConfigError


def ok(
    start: float, ttft: float, itl: list[float], prompt: int = 10, rid: str = "r"
) -> RequestResult:
    """A successful request whose tokens arrive at ttft, then after each ITL gap."""
    return RequestResult(
        request_id=rid,
        ok=True,
        start_s=start,
        e2e_s=ttft + sum(itl),
        ttft_s=ttft,
        itl_s=itl,
        prompt_tokens=prompt,
        max_tokens=len(itl) + 1,
        output_tokens=len(itl) + 1,
    )


def failed(start: float, kind: str) -> RequestResult:
    return RequestResult(
        request_id="f", ok=False, start_s=start, e2e_s=0.5, ttft_s=None, itl_s=[],
        prompt_tokens=10, max_tokens=4, output_tokens=0, error_kind=kind,
    )  # fmt: skip


def test_percentile_known_answers() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 90) == pytest.approx(90.1)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 100.0
    assert percentile([10.0, 20.0], 50) == 15.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0  # unsorted input
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_percentile_matches_numpy() -> None:
    rng = random.Random(5)
    for n in (1, 2, 3, 10, 97):
        values = [rng.lognormvariate(0, 1) for _ in range(n)]
        for q in (0, 1, 25, 50, 90, 99, 99.9, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_stats() -> None:
    stats = Stats.of([1.0, 2.0, 3.0, 4.0])
    assert stats is not None
    assert (stats.count, stats.mean, stats.p50, stats.min, stats.max) == (4, 2.5, 2.5, 1.0, 4.0)
    assert Stats.of([]) is None


def test_parse_durations_and_slo() -> None:
    assert parse_duration("500ms") == 0.5
    assert parse_duration("2s") == 2.0
    assert parse_duration(" 1.5 s") == 1.5
    for bad in ("500", "ms", "1h", "-1s"):
        with pytest.raises(ConfigError):
            parse_duration(bad)
    slo = Slo.parse("ttft=500ms,tpot=100ms")
    assert slo == Slo(ttft_s=0.5, tpot_s=0.1)
    assert Slo.parse("e2e=10s").e2e_s == 10.0
    assert slo.describe() == "ttft<=500ms and tpot<=100ms"
    for bad in ("", "ttft", "foo=1s", "ttft=fast"):
        with pytest.raises(ConfigError):
            Slo.parse(bad)


def test_tpot_and_slo_per_request() -> None:
    r = ok(0.0, ttft=0.4, itl=[0.1, 0.1, 0.1, 0.1, 0.1])  # 6 tokens
    assert r.e2e_s == pytest.approx(0.9)
    assert r.tpot_s == pytest.approx(0.1)
    assert ok(0.0, ttft=0.3, itl=[]).tpot_s is None  # one token: no TPOT
    slo = Slo(ttft_s=0.5, tpot_s=0.1)
    assert slo.met_by(r)
    assert not slo.met_by(ok(0.0, ttft=0.6, itl=[0.1]))
    assert not slo.met_by(ok(0.0, ttft=0.1, itl=[0.2, 0.2]))
    assert slo.met_by(ok(0.0, ttft=0.1, itl=[]))
    assert not slo.met_by(failed(0.0, "timeout"))


def test_compute_metrics_known_answers() -> None:
    results = [
        ok(0.0, 0.2, [0.1, 0.1, 0.1], prompt=100),  # ends 0.5, tpot 0.1
        ok(1.0, 0.4, [0.3, 0.3], prompt=50),  # ends 2.0, tpot 0.3
        ok(1.5, 0.6, [0.1], prompt=50),  # ends 2.2, tpot 0.1
        failed(3.0, "http_503"),  # ends 3.5
        failed(3.2, "timeout"),  # ends 3.7
        failed(3.4, "timeout"),  # ends 3.9
    ]
    m = compute_metrics(results, Slo(ttft_s=0.5, tpot_s=0.2))
    assert (m.num_requests, m.completed, m.failed) == (6, 3, 3)
    assert m.errors_by_kind == {"http_503": 1, "timeout": 2}
    assert m.duration_s == pytest.approx(3.9)
    assert m.request_throughput == pytest.approx(3 / 3.9)
    assert m.output_tokens == 4 + 3 + 2
    assert m.input_tokens == 200
    assert m.output_token_throughput == pytest.approx(9 / 3.9)
    assert m.total_token_throughput == pytest.approx(209 / 3.9)
    assert m.ttft_s is not None and m.ttft_s.mean == pytest.approx(0.4)
    assert m.ttft_s.p50 == pytest.approx(0.4)
    assert m.tpot_s is not None and m.tpot_s.p50 == pytest.approx(0.1)
    assert m.itl_s is not None and m.itl_s.count == 6
    assert m.itl_s.p50 == pytest.approx(0.1)
    assert m.e2e_s is not None and m.e2e_s.max == pytest.approx(1.0)
    # only the first request meets both (the second misses TPOT, the third TTFT)
    assert m.slo_met == 1
    assert m.slo_attainment == pytest.approx(1 / 6)
    assert m.goodput_rps == pytest.approx(1 / 3.9)
    assert compute_metrics(results, duration_s=10.0).request_throughput == pytest.approx(0.3)
    empty = compute_metrics([], Slo(ttft_s=1.0))
    assert empty.num_requests == 0 and empty.ttft_s is None and empty.slo_attainment == 0.0


def test_max_rate_meeting_slo() -> None:
    assert max_rate_meeting_slo([(1, 1.0), (2, 0.95), (4, 0.85), (8, 0.95)]) == 2
    assert max_rate_meeting_slo([(4, 0.5), (1, 0.99), (2, 0.9)]) == 2  # order-free, 0.9 passes
    assert max_rate_meeting_slo([(1, 0.5), (2, 1.0)]) is None
    assert max_rate_meeting_slo([(1, 1.0), (2, 1.0)]) == 2
    assert max_rate_meeting_slo([(1, 0.85), (2, 0.8)], threshold=0.8) == 2


async def test_search_max_rate_bisects_to_the_capacity() -> None:
    capacity = 3.3
    measured: list[float] = []

    async def measure(rate: float) -> float:
        measured.append(rate)
        return 1.0 if rate <= capacity else 0.4

    best, points = await search_max_rate(measure, 1.0, 10.0, iterations=8)
    assert best is not None and best <= capacity
    assert best > capacity * 0.95  # 8 geometric halvings of [1, 10] get within ~1%
    assert [r for r, _ in points] == measured
    assert len(points) == 2 + 8

    async def always(rate: float) -> float:
        return 1.0

    assert await search_max_rate(always, 1.0, 10.0) == (10.0, [(10.0, 1.0)])

    async def never(rate: float) -> float:
        return 0.0

    best, points = await search_max_rate(never, 1.0, 10.0)
    assert best is None and len(points) == 2
    with pytest.raises(ConfigError):
        await search_max_rate(never, 2.0, 1.0)


def test_target_goodput_rate_from_sweep_phases() -> None:
    slo = Slo(ttft_s=0.5)
    target = TargetResult("t", "http://x", "m")
    for rate, ttft in ((0.5, 0.1), (1.0, 0.2), (2.0, 0.9)):
        results = [ok(float(i), ttft, [0.05]) for i in range(10)]
        arrival = ArrivalSpec(kind=ArrivalKind.POISSON, rate=rate)
        target.phases.append(PhaseResult(arrival, compute_metrics(results, slo), results))
    assert target.goodput_rate() == 1.0
    closed = TargetResult("c", "http://x", "m")
    closed.phases.append(target.phases[0])
    closed.phases[0] = PhaseResult(ArrivalSpec(), target.phases[0].metrics, [])
    assert closed.goodput_rate() is None  # closed loop offers no rate
