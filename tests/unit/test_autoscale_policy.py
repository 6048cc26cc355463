"""The SLO planner on scripted metric series: the right pool, the right direction, bounds,
cooldowns, hysteresis (no flapping), convergence and the load forecast."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import pytest

from pdserve.autoscale.policy import PoolLimits, Slo, SloPlanner
from pdserve.autoscale.scaler import PoolSize
from pdserve.autoscale.signals import Signals
from pdserve.config import Role
from pdserve.errors import ConfigError

SLO = Slo(ttft_p90_s=1.0, itl_p90_s=0.1)
INTERVAL = 30.0


def signals(
    ttft: float | None = 0.8,
    itl: float | None = 0.08,
    rate: float = 2.0,
    prompt_tps: float = 400.0,
    gen_tps: float = 100.0,
    waiting: dict[Role, float] | None = None,
    kv: dict[Role, float] | None = None,
) -> Signals:
    return Signals(
        duration_s=INTERVAL,
        ttft_p90_s=ttft,
        itl_p90_s=itl,
        request_rate=rate,
        prompt_tokens_per_s=prompt_tps,
        generation_tokens_per_s=gen_tps,
        in_flight=rate,
        waiting=waiting or {},
        kv_usage=kv or {},
    )


IDLE = signals(ttft=None, itl=None, rate=0.0, prompt_tps=0.0, gen_tps=0.0)


class Sim:
    """Feeds a planner a series of windows; the pools converge at once on every change."""

    def __init__(self, limits: PoolLimits | None = None, prefill: int = 1, decode: int = 1):
        limits = limits or PoolLimits(min_replicas=1, max_replicas=4)
        self.planner = SloPlanner(SLO, {Role.PREFILL: limits, Role.DECODE: limits})
        self.sizes = {Role.PREFILL: prefill, Role.DECODE: decode}
        self.now = 0.0
        self.history: list[dict[Role, int]] = []
        self.reasons: list[str] = []

    def run(self, series: Iterable[Signals]) -> Sim:
        for s in series:
            self.now += INTERVAL
            sizes = {r: PoolSize(n, n) for r, n in self.sizes.items()}
            for d in self.planner.decide(self.now, s, sizes):
                self.sizes[d.role] = d.desired
                if d.changes:
                    self.reasons.append(f"{d.role}: {d.reason}")
            self.history.append(dict(self.sizes))
        return self

    def series(self, role: Role) -> list[int]:
        return [h[role] for h in self.history]


def reversals(values: list[int]) -> int:
    """How often the direction of change flips (up then down, or down then up)."""
    steps = [b - a for a, b in itertools.pairwise(values) if b != a]
    return sum(1 for a, b in itertools.pairwise(steps) if (a > 0) != (b > 0))


def test_slow_first_tokens_grow_the_prefill_pool_only() -> None:
    sim = Sim().run([signals(ttft=1.6)])
    assert sim.sizes == {Role.PREFILL: 2, Role.DECODE: 1}
    assert "p90 at 1.60x" in sim.reasons[0]


def test_slow_tokens_grow_the_decode_pool_only() -> None:
    sim = Sim().run([signals(itl=0.25)])
    assert sim.sizes == {Role.PREFILL: 1, Role.DECODE: 3}  # 2.5x over: two steps at once


def test_engine_queues_and_kv_usage_count_as_pressure() -> None:
    sim = Sim().run([signals(waiting={Role.PREFILL: 5.0})])
    assert sim.sizes == {Role.PREFILL: 2, Role.DECODE: 1}
    sim = Sim().run([signals(kv={Role.DECODE: 0.97})])
    assert sim.sizes == {Role.PREFILL: 1, Role.DECODE: 2}


def test_growth_stops_at_the_maximum() -> None:
    limits = PoolLimits(min_replicas=1, max_replicas=3, up_cooldown_s=0)
    sim = Sim(limits).run([signals(ttft=3.0, itl=0.3)] * 6)
    assert max(sim.series(Role.PREFILL)) == 3 and max(sim.series(Role.DECODE)) == 3
    assert sim.sizes == {Role.PREFILL: 3, Role.DECODE: 3}


def test_an_idle_cluster_shrinks_one_at_a_time_to_the_minimum() -> None:
    limits = PoolLimits(min_replicas=1, max_replicas=8, down_cooldown_s=60)
    sim = Sim(limits, prefill=4, decode=3).run([IDLE] * 20)
    prefill = sim.series(Role.PREFILL)
    assert prefill[-1] == 1 and sim.series(Role.DECODE)[-1] == 1
    assert all(a - b in (0, 1) for a, b in itertools.pairwise(prefill))
    # Not before `down_after_intervals` calm windows.
    assert prefill[: SLO.down_after_intervals - 1] == [4] * (SLO.down_after_intervals - 1)


def test_minimum_zero_lets_an_idle_pool_go_away() -> None:
    limits = PoolLimits(min_replicas=0, max_replicas=2, down_cooldown_s=0)
    sim = Sim(limits).run([IDLE] * 4)
    assert sim.sizes[Role.PREFILL] == 0


def test_a_pool_outside_its_bounds_is_brought_back_without_waiting() -> None:
    limits = PoolLimits(min_replicas=2, max_replicas=3)
    sim = Sim(limits, prefill=1, decode=5).run([signals()])
    assert sim.sizes == {Role.PREFILL: 2, Role.DECODE: 3}


def test_cooldown_holds_further_growth() -> None:
    limits = PoolLimits(min_replicas=1, max_replicas=8, up_cooldown_s=90)
    sim = Sim(limits).run([signals(ttft=1.5)] * 7)
    # Windows are 30 s apart: a change at most every third window. Each step is in
    # proportion to the excess (1.5x over: half the pool again, rounded up).
    assert sim.series(Role.PREFILL) == [2, 2, 2, 3, 3, 3, 5]


def test_shrinking_waits_for_its_longer_cooldown_after_a_change() -> None:
    limits = PoolLimits(min_replicas=1, max_replicas=8, up_cooldown_s=0, down_cooldown_s=300)
    sim = Sim(limits).run([signals(ttft=1.5)] + [IDLE] * 12)
    prefill = sim.series(Role.PREFILL)
    assert prefill[0] == 2
    first_down = prefill.index(1)
    assert first_down * INTERVAL >= 300


def test_latency_in_the_hysteresis_band_changes_nothing() -> None:
    # Between scale_down_below (0.6) and 1.0 of the target: no reason to move either way.
    series = [signals(ttft=t, itl=t / 10) for t in [0.65, 0.95, 0.7, 0.99, 0.62, 0.9] * 5]
    sim = Sim(prefill=2, decode=2).run(series)
    assert set(sim.series(Role.PREFILL)) == {2} and set(sim.series(Role.DECODE)) == {2}


def test_oscillating_load_does_not_flap() -> None:
    limits = PoolLimits(min_replicas=1, max_replicas=8, up_cooldown_s=60, down_cooldown_s=300)
    series = [signals(ttft=1.3, itl=0.13), signals(ttft=0.3, itl=0.03)] * 20
    sim = Sim(limits).run(series)
    assert reversals(sim.series(Role.PREFILL)) == 0
    assert reversals(sim.series(Role.DECODE)) == 0


def test_a_pool_converging_on_its_last_change_is_left_alone() -> None:
    planner = SloPlanner(SLO, {Role.DECODE: PoolLimits(up_cooldown_s=0)})
    (d,) = planner.decide(100.0, signals(itl=0.5), {Role.DECODE: PoolSize(3, 2)})
    assert not d.changes and "converging" in d.reason


def test_the_forecast_grows_a_pool_before_its_latency_suffers() -> None:
    limits = PoolLimits(min_replicas=1, max_replicas=8, up_cooldown_s=0)
    # Saturated once at 100 tokens/s on one replica: capacity is about 100 tokens/s.
    series = [signals(itl=0.15, gen_tps=100.0)]
    # Then the load ramps up while the latency stays inside its target.
    series += [signals(itl=0.08, gen_tps=tps) for tps in (110, 130, 150, 170, 190, 210, 230)]
    sim = Sim(limits).run(series)
    decode = sim.series(Role.DECODE)
    assert decode[0] == 2
    assert decode[-1] >= 3, decode
    assert any("forecast" in r for r in sim.reasons)


def test_a_steady_load_within_capacity_does_not_grow_the_pool() -> None:
    limits = PoolLimits(min_replicas=1, max_replicas=8, up_cooldown_s=0, capacity_hint=100.0)
    sim = Sim(limits, decode=2).run([signals(itl=0.08, gen_tps=150.0)] * 10)
    assert set(sim.series(Role.DECODE)) == {2}


def test_the_forecast_keeps_a_pool_from_shrinking_below_its_load() -> None:
    limits = PoolLimits(min_replicas=1, max_replicas=8, down_cooldown_s=0, capacity_hint=100.0)
    # Latency is low, but 150 tokens/s needs two replicas at 80 % of 100 tokens/s each.
    sim = Sim(limits, decode=3).run([signals(itl=0.03, gen_tps=150.0)] * 12)
    assert sim.series(Role.DECODE)[-1] == 2


@pytest.mark.parametrize(
    "make",
    [
        lambda: PoolLimits(min_replicas=3, max_replicas=2),
        lambda: PoolLimits(max_step_up=0),
        lambda: Slo(ttft_p90_s=0),
        lambda: Slo(scale_down_below=1.2),
    ],
)
def test_settings_that_cannot_work_are_refused(make: object) -> None:
    with pytest.raises(ConfigError):
        make()  # type: ignore[operator]
