"""Per-worker circuit breaker: the router's verdict on whether a worker gets traffic.

Fed from two sides: active health checks (the pool's GetLoad poll, with a deadline, so a
hung worker -- alive, socket open, SIGSTOPped -- fails them) and passive outcomes of real
requests (transport errors, deadlines). ``failure_threshold`` consecutive failures open
the breaker; after ``cooldown_s`` it is half-open: the next active check is the probe, and
its success closes the breaker (its failure re-opens it for another cooldown). Opening
also trips every stream running on the worker (``watch``), so a request stuck on a
hung worker fails over instead of waiting forever.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pdserve.config import HealthConfig

log = logging.getLogger(__name__)


class BreakerState(enum.IntEnum):
    """Values exported by the breaker-state gauge."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


@dataclass
class Trip:
    """One watched call: ``fired`` once the breaker opened while it ran."""

    close: Callable[[], object]
    fired: bool = False


@dataclass
class CircuitBreaker:
    config: HealthConfig = field(default_factory=HealthConfig)
    name: str = ""
    clock: Callable[[], float] = time.monotonic
    failures: int = 0  # consecutive
    opened_at: float | None = None
    # Called with no arguments whenever the breaker goes from closed/half-open to open.
    _on_open: dict[int, Callable[[], None]] = field(default_factory=dict)
    _next_listener: int = 0

    @property
    def state(self) -> BreakerState:
        if self.opened_at is None:
            return BreakerState.CLOSED
        if self.clock() - self.opened_at >= self.config.cooldown_s:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    def allows_traffic(self) -> bool:
        """Real requests go only to closed breakers; half-open waits for its probe."""
        return self.opened_at is None

    def record_success(self) -> None:
        state = self.state
        if state is BreakerState.OPEN:
            return  # an answer during the cooldown proves little: wait for the probe
        if state is BreakerState.HALF_OPEN:
            log.info("worker %s: probe succeeded, circuit closed", self.name)
        self.failures = 0
        self.opened_at = None

    def record_failure(self, reason: str = "") -> None:
        self.failures += 1
        state = self.state
        if state is BreakerState.HALF_OPEN or (
            state is BreakerState.CLOSED and self.failures >= self.config.failure_threshold
        ):
            log.warning(
                "worker %s: circuit open after %d consecutive failures (%s)",
                self.name,
                self.failures,
                reason,
            )
            self.opened_at = self.clock()
            for callback in list(self._on_open.values()):
                callback()

    def watch(self, cancel: Callable[[], object]) -> Trip:
        """Call ``cancel`` if the breaker opens before ``Trip.close()``; ``Trip.fired``
        then tells a trip from other cancellations (e.g. the client went away)."""
        key = self._next_listener
        self._next_listener += 1
        trip = Trip(close=lambda: self._on_open.pop(key, None))

        def fire() -> None:
            trip.fired = True
            cancel()

        self._on_open[key] = fire
        return trip
