"""The SLO planner: how many workers each pool should have, from one window of signals.

Each pool is sized separately against its own latency target: the prefill pool against
TTFT p90, the decode pool against ITL p90 (a colocated pool against the worse of both).

* Reactive: a pool over its target (or with engine queues / KV usage past their limits)
  grows at once, by more when it is further over (at most ``max_step_up`` per decision).
* Predictive: the pool's token throughput is forecast one interval ahead (Holt's linear
  trend). Once the pool has been seen saturated, its per-replica capacity is known
  (tokens/s it served while over target), and a forecast beyond what the current replicas
  can serve at ``target_utilization`` grows the pool before the latency suffers.
* Shrinking needs every signal well under target (hysteresis: ``scale_down_below`` of
  it) for ``down_after_intervals`` consecutive windows, and a forecast the smaller pool
  can still serve; it removes one worker at a time.
* Bounds (min/max replicas) always hold; cooldowns separate changes of one pool (longer
  for shrinking than for growing); a pool still converging on its last change (fewer
  ready than asked for) is left alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from pdserve.autoscale.scaler import PoolSize
from pdserve.autoscale.signals import Signals
from pdserve.config import Role
from pdserve.errors import ConfigError


@dataclass(frozen=True)
class PoolLimits:
    min_replicas: int = 1
    max_replicas: int = 8
    up_cooldown_s: float = 60.0
    down_cooldown_s: float = 300.0
    max_step_up: int = 2
    # Tokens/s one replica serves within its SLO (from `pdserve bench` or the simulator);
    # None: learned when the pool is first seen saturated.
    capacity_hint: float | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas:
            raise ConfigError(
                f"replica bounds need 0 <= min <= max (got {self.min_replicas}, "
                f"{self.max_replicas})"
            )
        if self.max_step_up < 1:
            raise ConfigError("max_step_up must be at least 1")


@dataclass(frozen=True)
class Slo:
    ttft_p90_s: float = 1.0
    itl_p90_s: float = 0.1
    # Hysteresis: a pool may shrink only while its latency is under this share of target.
    scale_down_below: float = 0.6
    down_after_intervals: int = 3
    # Pressure, per replica: engine queue length; KV cache usage (0..1).
    queue_per_replica_high: float = 2.0
    kv_usage_high: float = 0.9
    # Share of the learned capacity the forecast may fill before the pool grows.
    target_utilization: float = 0.8

    def __post_init__(self) -> None:
        if self.ttft_p90_s <= 0 or self.itl_p90_s <= 0:
            raise ConfigError("latency targets must be positive")
        if not 0 < self.scale_down_below < 1:
            raise ConfigError("scale_down_below must be between 0 and 1")


class HoltForecast:
    """Double exponential smoothing (level and trend) of a load series."""

    def __init__(self, alpha: float = 0.5, beta: float = 0.3) -> None:
        self.alpha, self.beta = alpha, beta
        self.level: float | None = None
        self.trend = 0.0

    def update(self, value: float) -> None:
        if self.level is None:
            self.level = value
            return
        previous = self.level
        self.level = self.alpha * value + (1 - self.alpha) * (previous + self.trend)
        self.trend = self.beta * (self.level - previous) + (1 - self.beta) * self.trend

    def predict(self, steps: float = 1.0) -> float:
        return max(0.0, (self.level or 0.0) + steps * self.trend)


@dataclass(frozen=True)
class Decision:
    role: Role
    current: int
    desired: int
    reason: str

    @property
    def changes(self) -> bool:
        return self.desired != self.current


@dataclass
class PoolPlanner:
    role: Role
    limits: PoolLimits
    slo: Slo
    forecast: HoltForecast = field(default_factory=HoltForecast)
    capacity: float | None = None  # tokens/s per replica at saturation
    last_change_at: float = -math.inf
    calm_windows: int = 0

    def __post_init__(self) -> None:
        self.capacity = self.limits.capacity_hint

    def step(
        self,
        now: float,
        size: PoolSize,
        latency_ratio: float | None,
        throughput: float,
        pressure: bool,
        idle: bool,
    ) -> Decision:
        """``latency_ratio``: observed p90 / target (None: no observation this window)."""
        current = size.target
        self.forecast.update(throughput)
        over = pressure or (latency_ratio is not None and latency_ratio > 1.0)
        if over and current > 0 and throughput > 0 and latency_ratio is not None:
            # Saturated: what each replica managed is (about) what it can do.
            per_replica = throughput / current
            self.capacity = (
                per_replica if self.capacity is None else 0.5 * (self.capacity + per_replica)
            )
        needed = self._needed()

        def decide(desired: int, reason: str) -> Decision:
            return self._bounded(now, current, desired, reason)

        if current < self.limits.min_replicas or current > self.limits.max_replicas:
            return decide(current, "outside its bounds")
        if size.ready < size.target:
            self.calm_windows = 0
            return Decision(self.role, current, current, "converging on the last change")
        if over:
            self.calm_windows = 0
            ratio = latency_ratio if latency_ratio is not None else 1.5
            step = max(1, math.ceil(current * (ratio - 1)))
            desired = current + min(step, self.limits.max_step_up)
            if needed is not None:
                desired = max(desired, min(needed, current + self.limits.max_step_up))
            why = "queue/KV pressure" if pressure else f"p90 at {ratio:.2f}x its target"
            return decide(desired, why)
        if needed is not None and needed > current:
            self.calm_windows = 0
            desired = min(needed, current + self.limits.max_step_up)
            return decide(desired, f"forecast {self.forecast.predict():.1f} tokens/s")
        calm = idle or (latency_ratio is not None and latency_ratio < self.slo.scale_down_below)
        if calm and (needed is None or needed < current):
            self.calm_windows += 1
            if self.calm_windows >= self.slo.down_after_intervals:
                return decide(current - 1, "idle" if idle else "latency well under target")
            return Decision(self.role, current, current, "calm, waiting to be sure")
        self.calm_windows = 0
        return Decision(self.role, current, current, "within target")

    def _needed(self) -> int | None:
        if not self.capacity:
            return None
        usable = self.capacity * self.slo.target_utilization
        return max(1, math.ceil(self.forecast.predict() / usable))

    def _bounded(self, now: float, current: int, desired: int, reason: str) -> Decision:
        desired = min(max(desired, self.limits.min_replicas), self.limits.max_replicas)
        outside = not self.limits.min_replicas <= current <= self.limits.max_replicas
        if not outside:
            since = now - self.last_change_at
            if desired > current and since < self.limits.up_cooldown_s:
                return Decision(self.role, current, current, f"cooling down ({reason})")
            if desired < current and since < self.limits.down_cooldown_s:
                return Decision(self.role, current, current, f"cooling down ({reason})")
        if desired != current:
            self.last_change_at = now
            self.calm_windows = 0
        return Decision(self.role, current, desired, reason)


class SloPlanner:
    """Sizes every configured pool from one window of signals."""

    def __init__(self, slo: Slo, limits: Mapping[Role, PoolLimits]) -> None:
        self.slo = slo
        self.pools = {role: PoolPlanner(role, lim, slo) for role, lim in limits.items()}

    def decide(
        self, now: float, signals: Signals, sizes: Mapping[Role, PoolSize]
    ) -> list[Decision]:
        idle = signals.request_rate == 0 and signals.in_flight == 0
        ttft = None if signals.ttft_p90_s is None else signals.ttft_p90_s / self.slo.ttft_p90_s
        itl = None if signals.itl_p90_s is None else signals.itl_p90_s / self.slo.itl_p90_s
        decisions = []
        for role, planner in self.pools.items():
            size = sizes.get(role)
            if size is None:
                continue
            replicas = max(size.target, 1)
            queued = signals.waiting.get(role, 0.0) / replicas > self.slo.queue_per_replica_high
            if role is Role.PREFILL:
                ratio, throughput, pressure = ttft, signals.prompt_tokens_per_s, queued
            elif role is Role.DECODE:
                kv_full = signals.kv_usage.get(role, 0.0) > self.slo.kv_usage_high
                ratio, throughput, pressure = (
                    itl,
                    signals.generation_tokens_per_s,
                    queued or kv_full,
                )
            else:
                known = [r for r in (ttft, itl) if r is not None]
                ratio = max(known) if known else None
                throughput = signals.prompt_tokens_per_s + signals.generation_tokens_per_s
                pressure = queued or signals.kv_usage.get(role, 0.0) > self.slo.kv_usage_high
            decisions.append(planner.step(now, size, ratio, throughput, pressure, idle))
        return decisions
