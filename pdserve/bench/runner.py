"""Runs a workload against one target, phase by phase, and keeps every result."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import httpx

from pdserve.bench.arrival import ArrivalKind, ArrivalSpec, run_arrivals
from pdserve.bench.client import ClientOptions, RequestResult, StreamingClient
from pdserve.bench.metrics import (
    DEFAULT_ATTAINMENT,
    RunMetrics,
    Slo,
    compute_metrics,
    max_rate_meeting_slo,
    search_max_rate,
)
from pdserve.bench.prefix_cache import EngineEndpoint, PrefixCacheProbe
from pdserve.bench.workloads import BenchRequest, Workload
from pdserve.errors import ConfigError

ResultHook = Callable[[RequestResult], None]
PhaseHook = Callable[[str, ArrivalSpec, int], ResultHook]
"""Called as (target name, arrival, request count) when a phase starts; returns a hook
called once per finished request (the CLI's progress bar)."""


@dataclass
class PhaseResult:
    arrival: ArrivalSpec
    metrics: RunMetrics
    results: list[RequestResult]

    def to_json(self) -> dict[str, Any]:
        return {
            "arrival": self.arrival.to_json(),
            "metrics": self.metrics.to_json(),
            "requests": [r.to_json() for r in self.results],
        }


@dataclass
class TargetResult:
    """Everything measured on one target (a setup started by compare, or a given URL)."""

    name: str
    url: str
    model: str
    phases: list[PhaseResult] = field(default_factory=list)
    setup: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    engines: list[EngineEndpoint] = field(default_factory=list)
    """Its engines' /metrics endpoints: each phase then records their prefix-cache hit rate."""

    def goodput_rate(self, threshold: float = DEFAULT_ATTAINMENT) -> float | None:
        points = [
            (p.arrival.offered_rate, p.metrics.slo_attainment)
            for p in self.phases
            if p.arrival.offered_rate is not None and p.metrics.slo_attainment is not None
        ]
        return max_rate_meeting_slo(points, threshold) if points else None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "url": self.url,
            "model": self.model,
            "setup": self.setup,
            "error": self.error,
            "goodput_rate": self.goodput_rate(),
            "phases": [p.to_json() for p in self.phases],
        }


@dataclass(frozen=True)
class RunPlan:
    """What each target is put through: the same workload under each arrival phase."""

    workload: Workload
    phases: Sequence[ArrivalSpec]
    client: ClientOptions
    slo: Slo | None = None
    warmup: Sequence[BenchRequest] = ()
    search: tuple[float, float, int] | None = None
    """(low, high, iterations): bisect Poisson rates for the goodput rate instead of
    running ``phases`` (whose first entry supplies everything but the rate)."""
    attainment: float = DEFAULT_ATTAINMENT
    cache_block_size: int | None = None
    """KV block size for the ideal prefix-cache hit rate (None: what the engines report)."""


async def served_model(url: str, timeout_s: float = 10.0) -> str:
    """The first model id ``GET /v1/models`` lists."""
    base = url.rstrip("/").removesuffix("/v1")
    try:
        async with httpx.AsyncClient(timeout=timeout_s, trust_env=False) as http:
            resp = await http.get(base + "/v1/models")
            resp.raise_for_status()
            return str(resp.json()["data"][0]["id"])
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"cannot read the model id from {base}/v1/models: {e}") from e


async def run_phase(
    client: StreamingClient,
    workload: Workload,
    arrival: ArrivalSpec,
    slo: Slo | None,
    on_result: ResultHook | None = None,
) -> PhaseResult:
    origin = time.perf_counter()

    async def send(request: BenchRequest) -> RequestResult:
        result = await client.send(request, origin)
        if on_result is not None:
            on_result(result)
        return result

    results = await run_arrivals(workload.chains, arrival, send)
    expected = len(workload.requests)
    if len(results) != expected:  # a scheduler bug, not a server failure
        raise RuntimeError(f"{len(results)} results for {expected} requests")
    return PhaseResult(arrival, compute_metrics(results, slo), results)


async def warm_up(client: StreamingClient, requests: Sequence[BenchRequest]) -> int:
    """Send warm-up requests one by one (not measured); returns how many failed."""
    failed = 0
    origin = time.perf_counter()
    for request in requests:
        result = await client.send(request, origin)
        failed += 0 if result.ok else 1
    return failed


async def run_target(
    target: TargetResult, plan: RunPlan, on_phase: PhaseHook | None = None
) -> TargetResult:
    """Run every phase of ``plan`` against ``target`` (in place; also returned)."""
    options = replace(plan.client, model=target.model)
    async with StreamingClient(target.url, options) as client:
        if plan.warmup:
            target.setup["warmup_failed"] = await warm_up(client, plan.warmup)
        count = len(plan.workload.requests)
        probe = PrefixCacheProbe(target.engines, plan.cache_block_size)

        async def run(arrival: ArrivalSpec) -> PhaseResult:
            hook = on_phase(target.name, arrival, count) if on_phase else None
            if target.engines:
                await probe.begin()
            phase = await run_phase(client, plan.workload, arrival, plan.slo, hook)
            if target.engines:
                stats = await probe.end(plan.workload, phase.results)
                phase.metrics = replace(phase.metrics, prefix_cache=stats)
            target.phases.append(phase)
            return phase

        if plan.search is None:
            for arrival in plan.phases:
                await run(arrival)
            return target
        if plan.slo is None:
            raise ConfigError("a rate search needs an SLO")
        low, high, iterations = plan.search
        base = plan.phases[0]

        async def measure(rate: float) -> float:
            phase = await run(replace(base, kind=ArrivalKind.POISSON, rate=rate))
            return phase.metrics.slo_attainment or 0.0

        best, _ = await search_max_rate(measure, low, high, iterations, plan.attainment)
        target.setup["searched_goodput_rate"] = best
    return target


async def run_interleaved(
    targets: Sequence[TargetResult], plan: RunPlan, on_phase: PhaseHook | None = None
) -> None:
    """Phase by phase, each target in turn, so slow drifts of a shared machine hit all alike.

    A rate search adapts to each target, so it runs target after target instead."""
    if plan.search is not None:
        for target in targets:
            await run_target(target, plan, on_phase)
        return
    clients = [StreamingClient(t.url, replace(plan.client, model=t.model)) for t in targets]
    try:
        if plan.warmup:
            for target, client in zip(targets, clients, strict=True):
                target.setup["warmup_failed"] = await warm_up(client, plan.warmup)
        for arrival in plan.phases:
            for target, client in zip(targets, clients, strict=True):
                count = len(plan.workload.requests)
                hook = on_phase(target.name, arrival, count) if on_phase else None
                phase = await run_phase(client, plan.workload, arrival, plan.slo, hook)
                target.phases.append(phase)
    finally:
        for client in clients:
            await client.aclose()
