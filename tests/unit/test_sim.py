"""The cluster simulator: exact timings for hand-checkable cases, queueing effects, the
routing policies, and a fit that recovers the service model from simulated benchmarks."""

from __future__ import annotations

import random

import pytest

from pdserve.errors import ConfigError
from pdserve.sim.engine import SimCluster, SimRequest, Topology, closed_loop, open_loop
from pdserve.sim.model import BenchPoint, ServiceModel, fit
from pdserve.sim.results import summarize, weighted_percentile

MODEL = ServiceModel(
    prefill_base_s=0.01,
    prefill_per_token_s=0.001,
    decode_base_s=0.02,
    decode_per_seq_s=0.005,
    kv_bytes_per_token=1000.0,
    link_bytes_per_s=1e6,  # 1 ms per token: transfers matter
    link_latency_s=0.002,
    overhead_s=0.05,
)


def run(cluster: SimCluster, requests: list[SimRequest]) -> list[SimRequest]:
    open_loop(cluster, requests)
    cluster.loop.run()
    return requests


def test_one_request_alone_takes_exactly_its_service_times() -> None:
    (r,) = run(SimCluster(MODEL, Topology(1, 1)), [SimRequest(0, 1.0, 100, 5)])
    prefill = 0.01 + 0.001 * 100
    transfer = 0.002 + 100 * 1000 / 1e6
    step = 0.02 + 0.005 * 1
    assert r.ttft == pytest.approx(0.05 + prefill + transfer + step)
    assert r.tpot == pytest.approx(step)


def test_transfers_to_one_decode_worker_share_its_link() -> None:
    model = ServiceModel(0.0, 0.0, 0.01, 0.0, 1000.0, 1e6, max_prefill_batch_tokens=100)
    # Two prefill workers finish at the same moment; both KV copies go to one decode link.
    a, b = run(
        SimCluster(model, Topology(2, 1), "round_robin"),
        [SimRequest(0, 0.0, 100, 1), SimRequest(1, 0.0, 100, 1)],
    )
    assert a.first_token is not None and b.first_token is not None
    assert abs(b.first_token - a.first_token) == pytest.approx(0.1)  # one transfer later


def test_requests_arriving_together_are_prefilled_as_one_batch() -> None:
    # An engine drains its input queue before it schedules a step: three prompts that
    # arrive at one instant share one prefill batch and get their first tokens together
    # (a worker that started on the first one alone would give it an earlier one).
    model = ServiceModel(0.01, 0.001, 0.02, 0.005, 0.0, 1e9, overhead_s=0.05)  # no transfer
    requests = run(
        SimCluster(model, Topology(1, 1)), [SimRequest(i, 0.0, 100, 5) for i in range(3)]
    )
    assert len({r.first_token for r in requests}) == 1
    prefill = 0.01 + 0.001 * 300
    step = 0.02 + 0.005 * 3
    assert requests[0].ttft == pytest.approx(0.05 + prefill + step, abs=1e-6)


def test_continuous_batching_slows_each_token_with_the_batch() -> None:
    cluster = SimCluster(MODEL, Topology(4, 1), "round_robin")
    requests = run(cluster, [SimRequest(i, 0.0, 10, 50) for i in range(4)])
    # All four decode together for most of their tokens: step = 0.02 + 4 * 0.005.
    assert summarize(requests, cluster.log).itl_p50_s == pytest.approx(0.04)


def test_kv_capacity_makes_requests_wait_for_room() -> None:
    small = ServiceModel(0.0, 0.0, 0.01, 0.0, 1.0, 1e9, decode_kv_capacity_tokens=150)
    a, b = run(
        SimCluster(small, Topology(1, 1)),
        [SimRequest(0, 0.0, 50, 40), SimRequest(1, 0.0, 50, 40)],
    )
    assert a.finished is not None and b.first_token is not None
    assert b.first_token > a.finished  # 90 + 90 tokens do not fit in 150 at once


def test_colocated_workers_prefill_in_chunks_between_decode_steps() -> None:
    model = ServiceModel(0.0, 0.001, 0.01, 0.0, 1.0, 1e9, chunk_tokens=100)
    (r,) = run(SimCluster(model, Topology(0, 0, colocated=1)), [SimRequest(0, 0.0, 250, 2)])
    # Three steps of 100, 100 and 50 prompt tokens; the first token ends the third.
    assert r.ttft == pytest.approx(3 * 0.01 + 0.25)


def test_closed_loop_keeps_the_concurrency() -> None:
    cluster = SimCluster(MODEL, Topology(1, 1))
    closed_loop(cluster, 3, [(20, 10)] * 12)
    cluster.loop.run()
    assert len(cluster.requests) == 12 and all(r.finished for r in cluster.requests)
    # Never more than three requests between arrival and finish at any time.
    events = sorted(
        [(r.arrival, 1) for r in cluster.requests]
        + [(r.finished or 0, -1) for r in cluster.requests]
    )
    level, peak = 0, 0
    for _, change in events:
        level += change
        peak = max(peak, level)
    assert peak == 3


def poisson(rate: float, n: int, seed: int = 1) -> list[SimRequest]:
    rng, t, out = random.Random(seed), 0.0, []
    for i in range(n):
        t += rng.expovariate(rate)
        out.append(SimRequest(i, t, rng.randint(50, 400), rng.randint(10, 60)))
    return out


def test_load_aware_routing_beats_random_at_scale() -> None:
    model = ServiceModel(0.005, 0.0002, 0.01, 0.0005, 1000.0, 1e9)
    p90 = {}
    for policy in ("random", "power_of_two", "least_requests"):
        cluster = SimCluster(model, Topology(8, 24), policy, seed=3)
        requests = run(cluster, poisson(rate=150.0, n=4000))
        p90[policy] = summarize(requests, cluster.log, since=2.0).ttft_p90_s
    assert p90["least_requests"] < p90["random"]
    assert p90["power_of_two"] < p90["random"]


def test_summary_counts_slo_attainment() -> None:
    cluster = SimCluster(MODEL, Topology(1, 1))
    requests = run(cluster, [SimRequest(0, 0.0, 100, 5), SimRequest(1, 10.0, 100, 5)])
    s = summarize(requests, cluster.log, slo_ttft_s=0.3, slo_tpot_s=0.1)
    assert s.completed == 2 and s.slo_attainment == 1.0
    tight = summarize(requests, cluster.log, slo_ttft_s=0.1)
    assert tight.slo_attainment == 0.0
    assert weighted_percentile([(1.0, 9), (5.0, 1)], 90) == 1.0
    assert weighted_percentile([(1.0, 8), (5.0, 2)], 90) == 5.0


def bench_point(model: ServiceModel, concurrency: int, prompt: int, output: int) -> BenchPoint:
    cluster = SimCluster(model, Topology(1, 1))
    closed_loop(cluster, concurrency, [(prompt, output)] * (10 * concurrency))
    cluster.loop.run()
    s = summarize(cluster.requests, cluster.log)
    return BenchPoint(
        concurrency, prompt, output, s.ttft_mean_s, s.itl_mean_s, s.itl_p50_s, s.itl_p90_s
    )


def fit_simulated(truth: ServiceModel) -> ServiceModel:
    """The model fitted from the three benchmark runs `pdserve sim validate` uses,
    simulated with ``truth``."""
    return fit(
        bench_point(truth, 1, 64, 32),
        bench_point(truth, 1, 768, 32),
        bench_point(truth, 4, 64, 32),
        kv_bytes_per_token=truth.kv_bytes_per_token,
        link_bytes_per_s=truth.link_bytes_per_s,
    )


def test_fit_recovers_the_model_from_simulated_benchmarks() -> None:
    truth = ServiceModel(0.0, 0.002, 0.03, 0.01, 50_000.0, 1e9, overhead_s=0.2)
    fitted = fit_simulated(truth)
    assert fitted.prefill_per_token_s == pytest.approx(0.002, rel=0.01)
    assert fitted.decode_base_s + fitted.decode_per_seq_s == pytest.approx(0.04, rel=0.01)
    # Under concurrency the batch is not always full (requests join and leave): the
    # slope comes out somewhat low, which the validation against real runs measures.
    assert fitted.decode_per_seq_s == pytest.approx(0.01, rel=0.3)
    assert fitted.overhead_s == pytest.approx(0.2, rel=0.05)
    assert fitted.decode_step_sigma == 0.0  # every simulated step took its exact time


def test_fit_takes_the_step_spread_from_the_single_request_run() -> None:
    truth = ServiceModel(0.0, 0.002, 0.03, 0.01, 50_000.0, 1e9, decode_step_sigma=0.15)
    fitted = fit_simulated(truth)
    assert fitted.decode_step_sigma == pytest.approx(0.15, rel=0.3)


def test_step_spread_keeps_the_mean_and_widens_the_tail() -> None:
    exact = ServiceModel(0.0, 0.001, 0.05, 0.0, 1.0, 1e9)
    spread = ServiceModel(0.0, 0.001, 0.05, 0.0, 1.0, 1e9, decode_step_sigma=0.2)
    summaries = []
    for model in (exact, spread):
        cluster = SimCluster(model, Topology(1, 1))
        closed_loop(cluster, 1, [(10, 200)] * 20)
        cluster.loop.run()
        summaries.append(summarize(cluster.requests, cluster.log))
    a, b = summaries
    assert a.itl_p90_s == pytest.approx(a.itl_p50_s)  # deterministic steps
    assert b.itl_mean_s == pytest.approx(a.itl_mean_s, rel=0.03)
    # Log-normal: p90 / p50 = exp(1.2816 * 0.2) = 1.29.
    assert b.itl_p90_s / b.itl_p50_s == pytest.approx(1.29, rel=0.05)


def test_fit_refuses_points_that_cannot_pin_the_model() -> None:
    p = BenchPoint(1, 64, 32, 1.0, 0.1)
    with pytest.raises(ConfigError):
        fit(p, p, BenchPoint(4, 64, 32, 2.0, 0.2), 1.0, 1.0)
