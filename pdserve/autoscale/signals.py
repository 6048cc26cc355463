"""What the planner sees: windows of the router's (and optionally the workers') metrics.

A ``Scrape`` is one reading of cumulative counters and histograms; ``Signals`` is the
difference of two readings (rates and percentiles over that window), the way Prometheus'
``rate()`` and ``histogram_quantile()`` read them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

from pdserve import metrics as names
from pdserve.config import Role
from pdserve.errors import ScalingError

# vLLM's own engine metrics, scraped from the workers.
VLLM_WAITING = "vllm:num_requests_waiting"
VLLM_KV_USAGE = "vllm:kv_cache_usage_perc"

Buckets = dict[float, float]  # upper bound -> cumulative count


@dataclass(frozen=True)
class Scrape:
    at: float  # monotonic seconds
    ttft: Buckets = field(default_factory=dict)
    itl: Buckets = field(default_factory=dict)
    requests: float = 0.0  # finished requests (TTFT observations)
    prompt_tokens: float = 0.0
    generation_tokens: float = 0.0
    in_flight: float = 0.0
    waiting: Mapping[Role, float] = field(default_factory=dict)  # engine queues, summed
    kv_usage: Mapping[Role, float] = field(default_factory=dict)  # mean over the pool


@dataclass(frozen=True)
class Signals:
    """One window of load and latency."""

    duration_s: float
    ttft_p90_s: float | None  # None: no request got its first token in the window
    itl_p90_s: float | None
    request_rate: float  # requests/s that got a first token
    prompt_tokens_per_s: float
    generation_tokens_per_s: float
    in_flight: float = 0.0
    waiting: Mapping[Role, float] = field(default_factory=dict)
    kv_usage: Mapping[Role, float] = field(default_factory=dict)


def histogram_quantile(q: float, buckets: Buckets) -> float | None:
    """Prometheus' histogram_quantile on cumulative ``buckets`` (linear inside a bucket;
    the +Inf bucket answers with the highest finite bound)."""
    if not buckets:
        return None
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            inside = count - lower_count
            fraction = 0.0 if inside <= 0 else (rank - lower_count) / inside
            return lower_bound + (bound - lower_bound) * fraction
        lower_bound, lower_count = bound, count
    return lower_bound


def window(before: Scrape, after: Scrape) -> Signals:
    duration = max(after.at - before.at, 1e-9)

    def delta(a: Buckets, b: Buckets) -> Buckets:
        return {le: max(0.0, b[le] - a.get(le, 0.0)) for le in b}

    return Signals(
        duration_s=duration,
        ttft_p90_s=histogram_quantile(0.9, delta(before.ttft, after.ttft)),
        itl_p90_s=histogram_quantile(0.9, delta(before.itl, after.itl)),
        request_rate=max(0.0, after.requests - before.requests) / duration,
        prompt_tokens_per_s=max(0.0, after.prompt_tokens - before.prompt_tokens) / duration,
        generation_tokens_per_s=max(0.0, after.generation_tokens - before.generation_tokens)
        / duration,
        in_flight=after.in_flight,
        waiting=dict(after.waiting),
        kv_usage=dict(after.kv_usage),
    )


def parse_router(text: str, at: float) -> Scrape:
    """A Scrape from the router's /metrics text (histograms summed over their labels)."""
    ttft: Buckets = {}
    itl: Buckets = {}
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == names.ROUTER_TTFT + "_bucket":
                le = float(sample.labels["le"])
                ttft[le] = ttft.get(le, 0.0) + sample.value
            elif sample.name == names.ROUTER_ITL + "_bucket":
                le = float(sample.labels["le"])
                itl[le] = itl.get(le, 0.0) + sample.value
            else:
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return Scrape(
        at=at,
        ttft=ttft,
        itl=itl,
        requests=values.get(names.ROUTER_TTFT + "_count", 0.0),
        prompt_tokens=values.get(names.ROUTER_PROMPT_TOKENS, 0.0),
        generation_tokens=values.get(names.ROUTER_GENERATION_TOKENS, 0.0),
        in_flight=values.get(names.ROUTER_IN_FLIGHT, 0.0),
    )


def engine_gauges(texts: Iterable[str]) -> tuple[float, float]:
    """(waiting requests summed, mean KV usage) over the workers' /metrics texts."""
    waiting, usage, n = 0.0, 0.0, 0
    for text in texts:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == VLLM_WAITING:
                    waiting += sample.value
                elif sample.name == VLLM_KV_USAGE:
                    usage += sample.value
                    n += 1
    return waiting, (usage / n if n else 0.0)


class MetricsSource:
    """Scrapes the router and, when given, each pool's worker /metrics URLs."""

    def __init__(
        self,
        router_url: str,
        worker_urls: Mapping[Role, list[str]] | None = None,
        timeout_s: float = 5.0,
    ) -> None:
        self.router_url = router_url.rstrip("/")
        self.worker_urls = dict(worker_urls or {})
        self.timeout_s = timeout_s

    def scrape(self, at: float) -> Scrape:
        base = parse_router(self._get(self.router_url + "/metrics"), at)
        waiting: dict[Role, float] = {}
        kv_usage: dict[Role, float] = {}
        for role, urls in self.worker_urls.items():
            texts = []
            for url in urls:
                try:
                    texts.append(self._get(url))
                except ScalingError:
                    continue  # a worker starting or leaving; the router's view still counts
            waiting[role], kv_usage[role] = engine_gauges(texts)
        return Scrape(
            at=base.at,
            ttft=base.ttft,
            itl=base.itl,
            requests=base.requests,
            prompt_tokens=base.prompt_tokens,
            generation_tokens=base.generation_tokens,
            in_flight=base.in_flight,
            waiting=waiting,
            kv_usage=kv_usage,
        )

    def _get(self, url: str) -> str:
        try:
            reply = httpx.get(url, timeout=self.timeout_s)
            reply.raise_for_status()
        except httpx.HTTPError as e:
            raise ScalingError(f"cannot scrape {url}: {e}") from e
        return reply.text
