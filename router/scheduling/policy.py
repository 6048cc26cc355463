"""Choosing one worker: filters -> weighted scorers -> picker.

A ``Policy`` is one configuration of that pipeline; the named policies (``POLICIES``)
are presets, and a YAML file or flags may reweight their scorers. Prefill and decode
each get their own policy; P/D is a configuration of the same pipeline, not a second
code path.
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from pdserve.errors import ConfigError, NoCapacityError
from pdserve.metrics import RoutingMetrics
from pdserve.router.kv_index.lookup import PrefixLookup
from pdserve.router.scheduling.cost import TransferCostModel
from pdserve.router.scheduling.filters import (
    Filter,
    KvCompatFilter,
    ModelFilter,
)
from pdserve.router.scheduling.pickers import (
    MaxScorePicker,
    Picker,
    RandomPicker,
    RoundRobinPicker,
)
from pdserve.router.scheduling.request import SchedulingRequest
from pdserve.router.scheduling.scorers import (
    KvUsageScorer,
    PrefixScorer,
    QueueScorer,
    RunningScorer,
    Scorer,
    SessionAffinityScorer,
    TransferCostScorer,
)
from pdserve.router.workers import WorkerClient
from pdserve.scheduling_config import PolicyConfig

MAX_LOAD_CACHE = 16384


@dataclass(frozen=True)
class Pick:
    worker: WorkerClient
    score: float
    # Leading prompt tokens the worker holds, per this policy's prefix lookup (0: none
    # or the policy does not look).
    cached_tokens: int


class Policy:
    def __init__(
        self,
        name: str,
        filters: Sequence[Filter],
        scorers: Sequence[tuple[Scorer, float]],
        picker: Picker,
        lookup: PrefixLookup | None = None,
        metrics: RoutingMetrics | None = None,
        pool: str = "",
    ) -> None:
        self.name = name
        self.filters = list(filters)
        self.scorers = [(s, w) for s, w in scorers if w > 0]
        self._load_scorers = [(s, w) for s, w in self.scorers if s.load_only]
        self._request_scorers = [(s, w) for s, w in self.scorers if not s.load_only]
        # address -> (load report, in-flight count, weighted sum of the load-only scores)
        self._load_cache: dict[str, tuple[object, int, float]] = {}
        self.picker = picker
        self.lookup = lookup
        self.metrics = metrics
        self.pool = pool

    def eligible(
        self, workers: Sequence[WorkerClient], request: SchedulingRequest
    ) -> list[WorkerClient]:
        candidates = list(workers)
        for f in self.filters:
            started = time.perf_counter()
            candidates = f.filter(candidates, request)
            self._timed(f.name, started)
            if not candidates:
                break
        return candidates

    def pick(self, workers: Sequence[WorkerClient], request: SchedulingRequest) -> Pick:
        """Filter, score and pick among ``workers``; NoCapacityError if none is eligible.
        Call ``commit`` once the pick is final."""
        candidates = self.eligible(workers, request)
        if not candidates:
            if self.metrics is not None:
                self.metrics.decisions.labels(self.pool, self.name, "no_candidate").inc()
            raise NoCapacityError("no healthy worker can serve this request; retry later")
        return self.choose(candidates, request)

    def choose(self, candidates: Sequence[WorkerClient], request: SchedulingRequest) -> Pick:
        """Score and pick among already filtered, non-empty ``candidates``."""
        totals = self._load_scores(candidates, request)
        for scorer, weight in self._request_scorers:
            started = time.perf_counter()
            for i, s in enumerate(scorer.score(candidates, request)):
                totals[i] += weight * s
            self._timed(scorer.name, started)
        started = time.perf_counter()
        chosen = self.picker.pick(totals)
        self._timed(self.picker.name, started)
        worker = candidates[chosen]
        cached = 0
        if self.lookup is not None:
            cached = request.matched_tokens(self.lookup).get(worker.address, 0)
        return Pick(worker, totals[chosen], cached)

    def _load_scores(
        self, candidates: Sequence[WorkerClient], request: SchedulingRequest
    ) -> list[float]:
        """The load-only scorers' weighted sum per candidate, recomputed only for workers
        whose load report or in-flight count changed since the last request."""
        if not self._load_scorers:
            return [0.0] * len(candidates)
        get = self._load_cache.get
        found = [
            c[2]
            if (c := get(w.address)) is not None and c[0] is w.load and c[1] == w.in_flight
            else None
            for w in candidates
        ]
        stale = [i for i, t in enumerate(found) if t is None]
        totals = [0.0 if t is None else t for t in found]
        if stale:
            workers = [candidates[i] for i in stale]
            for scorer, weight in self._load_scorers:
                started = time.perf_counter()
                for i, s in zip(stale, scorer.score(workers, request), strict=True):
                    totals[i] += weight * s
                self._timed(scorer.name, started)
            if len(self._load_cache) > MAX_LOAD_CACHE:
                self._load_cache.clear()  # workers that left
            for i, w in zip(stale, workers, strict=True):
                self._load_cache[w.address] = (w.load, w.in_flight, totals[i])
        return totals

    def commit(self, pick: Pick, request: SchedulingRequest) -> None:
        """The request goes to ``pick.worker``: stateful scorers learn, metrics count."""
        for scorer, _ in self.scorers:
            scorer.picked(pick.worker, request)
        if self.metrics is None:
            return
        hit = pick.cached_tokens > 0
        outcome = "prefix_hit" if hit else "no_prefix"
        self.metrics.decisions.labels(self.pool, self.name, outcome).inc()
        if self.lookup is not None:
            m = self.metrics
            m.prefix_requests.labels(self.pool, "hit" if hit else "miss").inc()
            m.prefix_tokens.labels(self.pool, "hit").inc(pick.cached_tokens)
            m.prefix_tokens.labels(self.pool, "miss").inc(request.prompt_len - pick.cached_tokens)
            m.index_blocks.labels(self.lookup.mode).set(self.lookup.index.size)

    def _timed(self, plugin: str, started: float) -> None:
        if self.metrics is not None:
            self.metrics.plugin_seconds.labels(self.pool, plugin).observe(
                time.perf_counter() - started
            )


@dataclass(frozen=True)
class Preset:
    """A named policy: default scorer weights, picker, and which prefix index it reads."""

    weights: Mapping[str, float]
    picker: str = "max_score"
    lookup: str | None = None  # "events" | "approximate" | None


_LOAD = {"queue": 1.0, "running": 1.0, "kv_usage": 0.5}
POLICIES: dict[str, Preset] = {
    "round_robin": Preset({}, picker="round_robin"),
    "random": Preset({}, picker="random"),
    "least_load": Preset(_LOAD),
    "prefix": Preset({"prefix": 2.0, **_LOAD}, lookup="approximate"),
    "kv_aware": Preset({"prefix": 2.0, **_LOAD}, lookup="events"),
    "session": Preset({"session": 4.0, **_LOAD}),
}
SCORER_NAMES = ("prefix", "queue", "running", "kv_usage", "transfer", "session")


@dataclass
class PolicyDeps:
    """What policies share: the model (filter), both prefix lookups, the cost model,
    metrics and a random source (seed it for reproducible tie-breaking)."""

    model_id: str | None
    events: PrefixLookup | None = None
    approximate: PrefixLookup | None = None
    cost: TransferCostModel | None = None
    metrics: RoutingMetrics | None = None
    rng: random.Random | None = None


def build_policy(config: PolicyConfig, pool: str, deps: PolicyDeps) -> Policy:
    preset = POLICIES.get(config.name)
    if preset is None:
        raise ConfigError(f"unknown policy {config.name!r}; available: {', '.join(POLICIES)}")
    unknown = set(config.weights) - set(SCORER_NAMES)
    if unknown:
        raise ConfigError(f"unknown scorers {sorted(unknown)}; available: {SCORER_NAMES}")
    weights = {**preset.weights, **config.weights}
    lookup_name = preset.lookup or ("events" if weights.get("prefix") else None)
    lookup = {"events": deps.events, "approximate": deps.approximate}.get(lookup_name or "")
    needs_lookup = bool(weights.get("prefix") or weights.get("transfer"))
    if needs_lookup and lookup is None:
        raise ConfigError(f"policy {config.name!r} needs a prefix index the router has not got")
    rng = deps.rng or random.Random()
    cost = deps.cost or TransferCostModel()
    makers: dict[str, Callable[[], Scorer]] = {
        "prefix": lambda: PrefixScorer(lookup),  # type: ignore[arg-type]
        "queue": QueueScorer,
        "running": RunningScorer,
        "kv_usage": KvUsageScorer,
        "transfer": lambda: TransferCostScorer(lookup, cost),  # type: ignore[arg-type]
        "session": SessionAffinityScorer,
    }
    scorers = [(makers[n](), w) for n, w in weights.items() if w > 0]
    pickers: dict[str, Callable[[], Picker]] = {
        "round_robin": RoundRobinPicker,
        "random": lambda: RandomPicker(rng),
        "max_score": lambda: MaxScorePicker(config.temperature, rng),
    }
    # Health and role are applied first by the planner, in one pass over the pool
    # (WorkerPool.healthy); these run on its result.
    filters: list[Filter] = []
    if deps.model_id is not None:
        filters.append(ModelFilter(deps.model_id))
    filters.append(KvCompatFilter())
    return Policy(
        config.name,
        filters,
        scorers,
        pickers[preset.picker](),
        lookup if needs_lookup else None,
        deps.metrics,
        pool,
    )


def make_policy(name: str, deps: PolicyDeps | None = None, pool: str = "") -> Policy:
    """A named policy with its default weights."""
    return build_policy(PolicyConfig(name), pool, deps or PolicyDeps(model_id=None))


# The first version's policy classes, as constructors of the same presets.
RoundRobin = functools.partial(make_policy, "round_robin")
LeastLoad = functools.partial(make_policy, "least_load")
