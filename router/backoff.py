"""Exponential backoff with jitter, for the router's retries (failover, discovery)."""

from __future__ import annotations

import math
import random

# 2**64 x any sane base is past every cap: the exponent stops there, so a source that
# keeps failing for days never overflows a float.
_MAX_DOUBLINGS = 64


class Backoff:
    """The wait before the n-th retry: ``initial_s``, doubling with each retry up to
    ``max_s``, times a factor drawn uniformly from [1 - jitter, 1 + jitter), so that
    clients retrying the same source do not move in step.

    A loop that retries one source calls ``failed()`` (counts the failure, returns the
    wait) and ``reset()`` after a success; ``wait_s(n)`` serves callers that count
    their retries themselves.
    """

    def __init__(
        self,
        initial_s: float,
        max_s: float = math.inf,
        jitter: float = 0.2,
        rng: random.Random | None = None,
    ) -> None:
        if initial_s < 0 or max_s < 0 or not 0 <= jitter <= 1:
            raise ValueError(f"bad backoff: initial {initial_s}, max {max_s}, jitter {jitter}")
        self.initial_s = initial_s
        self.max_s = max_s
        self.jitter = jitter
        self.rng = rng or random.Random()
        self.failures = 0

    def delay_s(self, retry: int) -> float:
        """The wait before retry number ``retry`` (1, 2, ...), before jitter."""
        return min(self.initial_s * 2.0 ** min(retry - 1, _MAX_DOUBLINGS), self.max_s)

    def wait_s(self, retry: int) -> float:
        """The jittered wait before retry number ``retry``."""
        spread = 1 - self.jitter + 2 * self.jitter * self.rng.random()
        return self.delay_s(retry) * spread

    def failed(self) -> float:
        """Count one more consecutive failure; returns the wait before the next try."""
        self.failures += 1
        return self.wait_s(self.failures)

    def reset(self) -> None:
        """A success: the next failure waits ``initial_s`` again."""
        self.failures = 0
