"""Latency statistics, throughput and SLO goodput over a set of request results.

Goodput follows DistServe: a request is good when it succeeded and met every SLO given;
SLO attainment is good / all requests sent (failures count against it); the goodput rate
of a sweep is the highest offered rate at which attainment is at least 90%.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from pdserve.bench.client import RequestResult
from pdserve.bench.prefix_cache import PrefixCacheStats
from pdserve.errors import ConfigError

DEFAULT_ATTAINMENT = 0.9
_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(ms|s)\s*$")


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between closest ranks.

    Matches ``numpy.percentile``'s default ("linear") method.
    """
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside 0..100")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True)
class Stats:
    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats | None:
        if not values:
            return None
        return cls(
            count=len(values),
            mean=sum(values) / len(values),
            p50=percentile(values, 50),
            p90=percentile(values, 90),
            p99=percentile(values, 99),
            min=min(values),
            max=max(values),
        )


def parse_duration(text: str) -> float:
    """``"500ms"`` -> 0.5, ``"2s"`` -> 2.0 (a unit is required)."""
    match = _DURATION.match(text)
    if not match:
        raise ConfigError(f"bad duration {text!r}: use e.g. 500ms or 2s")
    value = float(match.group(1))
    return value / 1000 if match.group(2) == "ms" else value


@dataclass(frozen=True)
class Slo:
    """Per-request service-level objectives, in seconds; None means not constrained."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None

    @classmethod
    def parse(cls, text: str) -> Slo:
        """``"ttft=500ms,tpot=100ms"`` (keys: ttft, tpot, e2e)."""
        values: dict[str, float] = {}
        for part in text.split(","):
            if not part.strip():
                continue
            key, sep, value = part.partition("=")
            key = key.strip().lower()
            if not sep or key not in ("ttft", "tpot", "e2e"):
                raise ConfigError(f"bad SLO {part!r}: use ttft=500ms,tpot=100ms[,e2e=10s]")
            values[key + "_s"] = parse_duration(value)
        if not values:
            raise ConfigError("an SLO needs at least one of ttft, tpot, e2e")
        return cls(**values)

    def met_by(self, result: RequestResult) -> bool:
        if not result.ok:
            return False
        if self.ttft_s is not None and (result.ttft_s is None or result.ttft_s > self.ttft_s):
            return False
        tpot = result.tpot_s  # a one-token answer has no TPOT and cannot miss it
        if self.tpot_s is not None and tpot is not None and tpot > self.tpot_s:
            return False
        return self.e2e_s is None or result.e2e_s <= self.e2e_s

    def describe(self) -> str:
        parts = [
            f"{name}<={value * 1000:g}ms"
            for name, value in (("ttft", self.ttft_s), ("tpot", self.tpot_s), ("e2e", self.e2e_s))
            if value is not None
        ]
        return " and ".join(parts)


@dataclass(frozen=True)
class RunMetrics:
    """Everything measured over one phase (one target, one arrival schedule)."""

    num_requests: int
    completed: int
    failed: int
    errors_by_kind: dict[str, int]
    duration_s: float
    request_throughput: float
    output_token_throughput: float
    total_token_throughput: float
    input_tokens: int
    output_tokens: int
    ttft_s: Stats | None
    tpot_s: Stats | None
    itl_s: Stats | None
    e2e_s: Stats | None
    slo: Slo | None = None
    slo_met: int | None = None
    slo_attainment: float | None = None
    goodput_rps: float | None = None
    prefix_cache: PrefixCacheStats | None = None
    """The engines' prefix-cache counters over the phase (setups whose engines we know)."""

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["prefix_cache"] = self.prefix_cache.to_json() if self.prefix_cache else None
        return out


def compute_metrics(
    results: Sequence[RequestResult], slo: Slo | None = None, duration_s: float | None = None
) -> RunMetrics:
    """Metrics over ``results``; the duration defaults to first start .. last end."""
    ok = [r for r in results if r.ok]
    if duration_s is None:
        duration_s = (
            max(r.end_s for r in results) - min(r.start_s for r in results) if results else 0.0
        )
    per_s = (1.0 / duration_s) if duration_s > 0 else 0.0
    input_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    slo_met = attainment = goodput = None
    if slo is not None:
        slo_met = sum(1 for r in results if slo.met_by(r))
        attainment = slo_met / len(results) if results else 0.0
        goodput = slo_met * per_s
    return RunMetrics(
        num_requests=len(results),
        completed=len(ok),
        failed=len(results) - len(ok),
        errors_by_kind=dict(Counter(r.error_kind or "unknown" for r in results if not r.ok)),
        duration_s=duration_s,
        request_throughput=len(ok) * per_s,
        output_token_throughput=output_tokens * per_s,
        total_token_throughput=(input_tokens + output_tokens) * per_s,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        ttft_s=Stats.of([r.ttft_s for r in ok if r.ttft_s is not None]),
        tpot_s=Stats.of([t for r in ok if (t := r.tpot_s) is not None]),
        itl_s=Stats.of([gap for r in ok for gap in r.itl_s]),
        e2e_s=Stats.of([r.e2e_s for r in ok]),
        slo=slo,
        slo_met=slo_met,
        slo_attainment=attainment,
        goodput_rps=goodput,
    )


def max_rate_meeting_slo(
    points: Sequence[tuple[float, float]], threshold: float = DEFAULT_ATTAINMENT
) -> float | None:
    """Highest rate of a sweep whose attainment >= threshold, with every lower rate passing too.

    ``points`` are (offered rate, SLO attainment). A pass above a failure is treated as
    noise, not capacity, so the answer is the last rate before the first failure; None
    when even the lowest rate fails.
    """
    best: float | None = None
    for rate, attainment in sorted(points):
        if attainment < threshold:
            break
        best = rate
    return best


async def search_max_rate(
    measure: Callable[[float], Awaitable[float]],
    low: float,
    high: float,
    iterations: int = 4,
    threshold: float = DEFAULT_ATTAINMENT,
) -> tuple[float | None, list[tuple[float, float]]]:
    """Bisect (geometrically) for the highest rate in [low, high] meeting the attainment.

    ``measure(rate)`` runs a phase at ``rate`` and returns its SLO attainment. Returns the
    best passing rate found (None if ``low`` fails) and every (rate, attainment) measured.
    """
    if not 0 < low < high:
        raise ConfigError("a rate search needs 0 < low < high")
    points = [(high, await measure(high))]
    if points[-1][1] >= threshold:
        return high, points
    points.append((low, await measure(low)))
    if points[-1][1] < threshold:
        return None, points
    passing, failing = low, high
    for _ in range(iterations):
        mid = math.sqrt(passing * failing)
        attainment = await measure(mid)
        points.append((mid, attainment))
        if attainment >= threshold:
            passing = mid
        else:
            failing = mid
    return passing, points
