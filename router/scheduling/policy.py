"""Choosing one worker among capable candidates.

A policy sees only healthy candidates of the right role and returns one of them. The
context-aware policies (prefix overlap, KV events, transfer cost) plug in here.
"""

from __future__ import annotations

import abc
import itertools
from collections.abc import Sequence

from pdserve.errors import ConfigError
from pdserve.router.workers import WorkerClient


class Policy(abc.ABC):
    name: str

    @abc.abstractmethod
    def pick(
        self, candidates: Sequence[WorkerClient], prompt_token_ids: Sequence[int]
    ) -> WorkerClient:
        """Return one of ``candidates`` (never empty)."""


class RoundRobin(Policy):
    name = "round_robin"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def pick(
        self, candidates: Sequence[WorkerClient], prompt_token_ids: Sequence[int]
    ) -> WorkerClient:
        return candidates[next(self._counter) % len(candidates)]


class LeastLoad(Policy):
    """Fewest requests in flight from this router, then fewest running/waiting on the worker."""

    name = "least_load"

    def pick(
        self, candidates: Sequence[WorkerClient], prompt_token_ids: Sequence[int]
    ) -> WorkerClient:
        return min(
            candidates,
            key=lambda w: (w.in_flight, w.load.running_requests + w.load.waiting_requests),
        )


POLICIES: dict[str, type[Policy]] = {p.name: p for p in (RoundRobin, LeastLoad)}


def make_policy(name: str) -> Policy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ConfigError(f"unknown policy {name!r}; available: {', '.join(POLICIES)}") from None
