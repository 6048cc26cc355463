"""Admission control: bounded in-flight requests and a bounded wait queue.

A request takes a slot before any worker is touched. With every slot taken it waits in
a FIFO queue of at most ``max_queue`` requests for at most ``queue_timeout_s``; beyond
either it is refused at once with ``OverloadedError`` (HTTP 429 with Retry-After, gRPC
RESOURCE_EXHAUSTED), so overload turns into fast refusals, not unbounded queues. A
finished request hands its slot straight to the oldest waiter.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from pdserve.config import AdmissionConfig
from pdserve.errors import OverloadedError
from pdserve.metrics import RouterMetrics
from pdserve.router.workers import WorkerClient


class Admission:
    def __init__(self, config: AdmissionConfig, metrics: RouterMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self.in_flight = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def _refuse(self, reason: str, message: str) -> OverloadedError:
        self.metrics.rejected.labels(reason).inc()
        return OverloadedError(message, retry_after_s=self.config.retry_after_s)

    @asynccontextmanager
    async def admitted(self) -> AsyncIterator[None]:
        await self._acquire()
        try:
            yield
        finally:
            self._release()

    async def _acquire(self) -> None:
        limit = self.config.max_in_flight
        if not limit or (self.in_flight < limit and not self._waiters):
            self.in_flight += 1
            return
        if len(self._waiters) >= self.config.max_queue:
            raise self._refuse(
                "overload",
                f"the server is at capacity ({limit} requests running, "
                f"{len(self._waiters)} waiting); retry later",
            )
        slot: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(slot)
        self.metrics.queued.inc()
        try:
            await asyncio.wait_for(asyncio.shield(slot), self.config.queue_timeout_s)
        except (TimeoutError, asyncio.CancelledError) as e:
            if slot.done():
                self._release()  # the slot arrived as we gave up: pass it on
            else:
                slot.cancel()
                self._waiters.remove(slot)
            if isinstance(e, asyncio.CancelledError):
                raise
            raise self._refuse(
                "queue_timeout",
                f"no capacity within {self.config.queue_timeout_s:g} s; retry later",
            ) from None
        finally:
            self.metrics.queued.dec()

    def _release(self) -> None:
        while self._waiters:
            slot = self._waiters.popleft()
            if not slot.done():
                slot.set_result(None)  # the slot moves to the waiter: in_flight unchanged
                return
        self.in_flight -= 1

    def check_worker(self, worker: WorkerClient) -> None:
        """Refuse when the chosen worker already runs the per-worker limit from this
        router (the decode policy picks the least loaded one, so all are that full)."""
        limit = self.config.max_in_flight_per_worker
        if limit and worker.in_flight >= limit:
            raise self._refuse(
                "worker_limit",
                f"every worker runs its limit of {limit} requests; retry later",
            )
