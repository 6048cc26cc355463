"""What a simulation run measured, in the terms `pdserve bench` reports."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from pdserve.sim.engine import SimRequest, StepLog


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (as numpy.percentile)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def weighted_percentile(pairs: Sequence[tuple[float, int]], q: float) -> float:
    """Percentile of values that occur ``weight`` times each."""
    ordered = sorted((v, w) for v, w in pairs if w > 0)
    total = sum(w for _, w in ordered)
    if total == 0:
        return math.nan
    rank, seen = q / 100 * total, 0
    for value, weight in ordered:
        seen += weight
        if seen >= rank:
            return value
    return ordered[-1][0]


@dataclass(frozen=True)
class SimSummary:
    requests: int
    completed: int
    duration_s: float
    request_throughput: float
    ttft_mean_s: float
    ttft_p50_s: float
    ttft_p90_s: float
    itl_mean_s: float
    itl_p50_s: float
    itl_p90_s: float
    tpot_mean_s: float
    slo_attainment: float | None = None  # share of requests meeting TTFT and TPOT targets

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def summarize(
    requests: Sequence[SimRequest],
    log: StepLog,
    slo_ttft_s: float | None = None,
    slo_tpot_s: float | None = None,
    since: float = 0.0,
) -> SimSummary:
    """Requests that arrived at or after ``since`` (a warm-up is left out)."""
    measured = [r for r in requests if r.arrival >= since]
    done = [r for r in measured if r.finished is not None]
    ttfts = [r.ttft for r in done if r.ttft is not None]
    tpots = [r.tpot for r in done if r.tpot is not None]
    gaps = [(d, n) for d, n in log.steps]
    total_gaps = sum(n for _, n in gaps)
    start = min((r.arrival for r in measured), default=0.0)
    end = max((r.finished or 0.0 for r in done), default=start)
    duration = max(end - start, 1e-9)
    attainment = None
    if slo_ttft_s is not None or slo_tpot_s is not None:
        met = sum(
            1
            for r in done
            if (slo_ttft_s is None or (r.ttft or math.inf) <= slo_ttft_s)
            and (slo_tpot_s is None or r.tpot is None or r.tpot <= slo_tpot_s)
        )
        attainment = met / len(measured) if measured else 0.0
    return SimSummary(
        requests=len(measured),
        completed=len(done),
        duration_s=duration,
        request_throughput=len(done) / duration,
        ttft_mean_s=sum(ttfts) / len(ttfts) if ttfts else math.nan,
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p90_s=percentile(ttfts, 90),
        itl_mean_s=sum(d * n for d, n in gaps) / total_gaps if total_gaps else math.nan,
        itl_p50_s=weighted_percentile(gaps, 50),
        itl_p90_s=weighted_percentile(gaps, 90),
        tpot_mean_s=sum(tpots) / len(tpots) if tpots else math.nan,
        slo_attainment=attainment,
    )
