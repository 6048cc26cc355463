"""The autoscaler: every interval, read a window of signals, decide, resize.

`pdserve planner` runs it against a router's /metrics and a Scaler backend.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from pdserve.autoscale.policy import Decision, SloPlanner
from pdserve.autoscale.scaler import Scaler
from pdserve.autoscale.signals import MetricsSource, Scrape, window
from pdserve.errors import ScalingError

log = logging.getLogger(__name__)


class Autoscaler:
    def __init__(
        self,
        source: MetricsSource,
        planner: SloPlanner,
        scaler: Scaler,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.planner = planner
        self.scaler = scaler
        self.clock = clock
        self._previous: Scrape | None = None

    def tick(self) -> list[Decision]:
        """One window: scrape, decide, apply the changes. The first call only reads."""
        now = self.clock()
        scrape = self.source.scrape(now)
        previous, self._previous = self._previous, scrape
        if previous is None:
            return []
        signals = window(previous, scrape)
        decisions = self.planner.decide(now, signals, self.scaler.sizes())
        for d in decisions:
            if d.changes:
                log.info("%s pool: %d -> %d (%s)", d.role, d.current, d.desired, d.reason)
                self.scaler.scale(d.role, d.desired)
        return decisions

    def run(self, interval_s: float, stop: Callable[[], bool] = lambda: False) -> None:
        while not stop():
            try:
                self.tick()
            except ScalingError as e:  # a scrape or a scaling call failed: try next time
                log.warning("autoscaler: %s", e.message)
            time.sleep(interval_s)
