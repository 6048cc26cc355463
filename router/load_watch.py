"""Fresh worker load: one WatchLoad stream per worker updates ``WorkerClient.load`` as the
worker's scheduler changes (within the stream's interval), between the pool's slower
health polls. Workers without WatchLoad keep the polled view."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc

from pdserve.router.workers import WorkerClient, WorkerPool
from pdserve.v1 import worker_pb2 as pb

log = logging.getLogger(__name__)
# Asked of every worker: the router's view of its load is at most this old.
WATCH_INTERVAL_MS = 50
RETRY_S = 1.0


class LoadWatcher:
    def __init__(self, pool: WorkerPool, interval_ms: int = WATCH_INTERVAL_MS) -> None:
        self.pool = pool
        self.interval_ms = interval_ms
        # address -> (the worker object watched, its task)
        self._tasks: dict[str, tuple[WorkerClient, asyncio.Task[None]]] = {}
        self._unsupported: set[str] = set()

    def sync(self) -> None:
        """Watch every worker that has joined; stop watching those that left."""
        present = {w.address: w for w in self.pool.workers if w.info is not None}
        for address in list(self._tasks):
            worker, task = self._tasks[address]
            if present.get(address) is not worker or task.done():
                task.cancel()
                del self._tasks[address]
        for address, worker in present.items():
            if address not in self._tasks and address not in self._unsupported:
                self._tasks[address] = (worker, asyncio.create_task(self._watch(worker)))

    async def _watch(self, worker: WorkerClient) -> None:
        request = pb.WatchLoadRequest(interval_ms=self.interval_ms)
        while True:
            try:
                async for report in worker.stub.WatchLoad(request):
                    worker.load = report
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                    log.info("worker %s has no WatchLoad; its load is polled", worker.name)
                    self._unsupported.add(worker.address)
                    return
            await asyncio.sleep(RETRY_S)

    async def close(self) -> None:
        tasks = [t for _, t in self._tasks.values()]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
