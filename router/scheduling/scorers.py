"""Scorers: each rates every candidate in [0, 1] (1 = best); policies weight and add them."""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Sequence

from pdserve.router.kv_index.lookup import PrefixLookup
from pdserve.router.scheduling.cost import TransferCostModel
from pdserve.router.scheduling.request import SchedulingRequest
from pdserve.router.workers import WorkerClient


class Scorer(abc.ABC):
    name: str
    # True: the score depends only on the worker's load report and this router's
    # in-flight count, so a policy may reuse it until either changes.
    load_only = False

    @abc.abstractmethod
    def score(self, candidates: Sequence[WorkerClient], request: SchedulingRequest) -> list[float]:
        """One value in [0, 1] per candidate, in order."""

    def picked(self, worker: WorkerClient, request: SchedulingRequest) -> None:
        """The request was sent to ``worker`` (stateful scorers learn from it)."""
        return None


def _saturating(value: float, half: float) -> float:
    """1 at 0, 0.5 at ``half``, towards 0 beyond: load rated on an absolute scale, so a
    lone busy worker is not rated like an idle one."""
    return 1.0 - value / (value + half) if value > 0 else 1.0


class PrefixScorer(Scorer):
    """Share of the prompt the worker already holds in its prefix cache."""

    name = "prefix"

    def __init__(self, lookup: PrefixLookup) -> None:
        self.lookup = lookup

    def score(self, candidates: Sequence[WorkerClient], request: SchedulingRequest) -> list[float]:
        matched = request.matched_tokens(self.lookup)
        if not matched:
            return [0.0] * len(candidates)
        # Matched tokens are whole blocks of the prompt: never more than its length.
        inv = 1.0 / max(request.prompt_len, 1)
        get = matched.get
        return [get(w.address, 0) * inv for w in candidates]

    def picked(self, worker: WorkerClient, request: SchedulingRequest) -> None:
        self.lookup.observe(worker.address, request.blocks)


class QueueScorer(Scorer):
    """Requests waiting in the worker's scheduler."""

    name = "queue"
    load_only = True

    def __init__(self, half: float = 4.0) -> None:
        self.half = half

    def score(self, candidates: Sequence[WorkerClient], request: SchedulingRequest) -> list[float]:
        return [_saturating(w.load.waiting_requests, self.half) for w in candidates]


class RunningScorer(Scorer):
    """Requests running on the worker: its last report, or this router's own count when
    that is higher (fresher between reports)."""

    name = "running"
    load_only = True

    def __init__(self, half: float = 8.0) -> None:
        self.half = half

    def score(self, candidates: Sequence[WorkerClient], request: SchedulingRequest) -> list[float]:
        return [
            _saturating(max(w.load.running_requests, w.in_flight), self.half) for w in candidates
        ]


class KvUsageScorer(Scorer):
    """Free share of the worker's KV cache."""

    name = "kv_usage"
    load_only = True

    def score(self, candidates: Sequence[WorkerClient], request: SchedulingRequest) -> list[float]:
        return [min(max(1.0 - w.load.kv_cache_usage, 0.0), 1.0) for w in candidates]


class TransferCostScorer(Scorer):
    """Estimated seconds to move the prompt's KV that the worker does not hold yet
    (what a decode worker must pull from the prefill worker)."""

    name = "transfer"

    def __init__(self, lookup: PrefixLookup, cost: TransferCostModel, half_s: float = 0.05) -> None:
        self.lookup = lookup
        self.cost = cost
        self.half_s = half_s

    def score(self, candidates: Sequence[WorkerClient], request: SchedulingRequest) -> list[float]:
        matched = request.matched_tokens(self.lookup)
        return [
            _saturating(
                self.cost.transfer_s(w, max(request.prompt_len - matched.get(w.address, 0), 0)),
                self.half_s,
            )
            for w in candidates
        ]


class SessionAffinityScorer(Scorer):
    """1 for the session's worker, 0 for the others (rendezvous hashing: a session moves
    only when its worker leaves); 0.5 for all when the request names no session."""

    name = "session"

    def score(self, candidates: Sequence[WorkerClient], request: SchedulingRequest) -> list[float]:
        if not request.session_key:
            return [0.5] * len(candidates)
        key = request.session_key.encode()
        ranks = [
            hashlib.blake2b(key + b"\0" + w.address.encode(), digest_size=8).digest()
            for w in candidates
        ]
        best = max(range(len(candidates)), key=ranks.__getitem__)
        return [1.0 if i == best else 0.0 for i in range(len(candidates))]
