"""Keeping the exact prefix index current from each worker's vLLM KV event stream.

One ``KvEventSubscriber`` per worker: a ZMQ SUB socket on the worker's publisher, and on
joining or on a sequence-number gap a replay from the publisher's ROUTER socket (vLLM
keeps the last ``buffer_steps`` batches). If the replay cannot fill the gap the worker's
entries are cleared and rebuilt from later events: the index then knows a subset of what
the worker holds (it under-estimates overlap, it never invents it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import zmq
import zmq.asyncio

from pdserve.metrics import RoutingMetrics
from pdserve.router.kv_index.events import (
    END_SEQ,
    BlockStored,
    EventBatch,
    as_int_hash,
    decode_batch,
)
from pdserve.router.kv_index.hashing import BlockHasher
from pdserve.router.kv_index.index import PrefixIndex

log = logging.getLogger(__name__)
REPLAY_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class EventSource:
    """Where a worker publishes its KV events (reported in its WorkerInfo)."""

    endpoint: str
    replay_endpoint: str | None = None


def _seq(frame: bytes) -> int:
    return int.from_bytes(frame, "big", signed=True)


class KvEventSubscriber:
    """Applies one worker's event batches to ``index`` in sequence order."""

    def __init__(
        self,
        worker: str,
        source: EventSource,
        index: PrefixIndex,
        metrics: RoutingMetrics,
        hasher: BlockHasher | None = None,
        context: zmq.asyncio.Context | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.worker = worker
        self.source = source
        self.index = index
        self.metrics = metrics
        self.hasher = hasher  # checks parentless blocks against our own hashing
        self._ctx = context or zmq.asyncio.Context.instance()
        self._clock = clock
        self.next_seq: int | None = None  # None: nothing applied yet (joining)
        self._mismatch_logged = False

    async def run(self) -> None:
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.setsockopt(zmq.LINGER, 0)
        sub.connect(self.source.endpoint)
        try:
            while True:
                frames = await sub.recv_multipart()
                if len(frames) != 3:
                    log.warning(
                        "worker %s: KV event message with %d frames", self.worker, len(frames)
                    )
                    continue
                await self.handle(_seq(frames[1]), frames[2])
        finally:
            sub.close(linger=0)

    async def handle(self, seq: int, payload: bytes) -> None:
        """One live batch: resync first if batches before it are missing."""
        if self.next_seq is None:
            self.metrics.event_resyncs.labels("join").inc()
            await self._resync(0, seq)
        elif seq > self.next_seq:
            self.metrics.event_resyncs.labels("gap").inc()
            await self._resync(self.next_seq, seq)
        elif seq == 0 and self.next_seq > 1:
            # A new publisher (the engine restarted): what we knew is gone.
            self.metrics.event_resyncs.labels("restart").inc()
            self.index.clear(self.worker)
        elif seq < self.next_seq:
            return  # already applied through a replay
        self._apply(seq, payload)

    async def _resync(self, start: int, live_seq: int) -> None:
        """Apply batches ``start .. live_seq-1`` from the replay socket; if the publisher
        no longer has them all, clear this worker first and apply what it has."""
        if live_seq > start:
            replayed = await self._replay(start) if self.source.replay_endpoint else []
            batches = [(s, p) for s, p in replayed if start <= s < live_seq]
            if [s for s, _ in batches] != list(range(start, live_seq)):
                self.metrics.event_resyncs.labels("replay_failed").inc()
                log.info(
                    "worker %s: KV events %d..%d not replayable; rebuilding its index entries",
                    self.worker,
                    start,
                    live_seq - 1,
                )
                self.index.clear(self.worker)
            for seq, payload in batches:
                self._apply(seq, payload)
        self.next_seq = live_seq

    async def _replay(self, start: int) -> list[tuple[int, bytes]]:
        assert self.source.replay_endpoint is not None
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.source.replay_endpoint)
        out: list[tuple[int, bytes]] = []
        try:
            await sock.send_multipart([b"", start.to_bytes(8, "big")])
            while True:
                frames = await asyncio.wait_for(sock.recv_multipart(), REPLAY_TIMEOUT_S)
                # [empty delimiter, topic, seq, payload]
                if len(frames) != 4:
                    continue
                seq = _seq(frames[2])
                if seq == END_SEQ:
                    return out
                out.append((seq, frames[3]))
        except TimeoutError:
            log.warning("worker %s: KV event replay timed out", self.worker)
            return []
        finally:
            sock.close(linger=0)

    def _apply(self, seq: int, payload: bytes) -> None:
        try:
            batch = decode_batch(payload)
        except msgspec.DecodeError as e:
            # Treat an undecodable batch as lost: the next one resyncs.
            log.warning("worker %s: undecodable KV event batch %d: %s", self.worker, seq, e)
            return
        self._check_hashes(batch)
        self.index.apply(self.worker, batch.events)
        self.next_seq = seq + 1
        self.metrics.event_lag.observe(max(0.0, self._clock() - batch.ts))

    def _check_hashes(self, batch: EventBatch) -> None:
        """A parentless stored block must hash, by our algorithm, to the engine's value."""
        if self.hasher is None:
            return
        for event in batch.events:
            if (
                isinstance(event, BlockStored)
                and event.parent_block_hash is None
                and event.block_hashes
                and event.block_size == self.hasher.block_size
                and len(event.token_ids) >= event.block_size
                and not event.extra_keys
            ):
                ours = self.hasher.first_block_hash(event.token_ids[: event.block_size])
                if ours != as_int_hash(event.block_hashes[0]):
                    self.metrics.hash_mismatches.inc()
                    if not self._mismatch_logged:
                        self._mismatch_logged = True
                        log.error(
                            "worker %s: the router's block hashes differ from the engine's "
                            "(hash algorithm or PYTHONHASHSEED differ); prefix routing to "
                            "it will find no overlap",
                            self.worker,
                        )


class KvEventHub:
    """One subscriber task per worker with an event source; started and stopped as
    workers join and leave (``sync``)."""

    def __init__(self, index: PrefixIndex, metrics: RoutingMetrics) -> None:
        self.index = index
        self.metrics = metrics
        self._ctx = zmq.asyncio.Context()
        self._tasks: dict[str, tuple[EventSource, asyncio.Task[None]]] = {}

    def sync(self, sources: dict[str, tuple[EventSource, BlockHasher | None]]) -> None:
        """``sources``: worker key -> its event source, for every worker now present."""
        for worker in list(self._tasks):
            source, task = self._tasks[worker]
            if worker not in sources or sources[worker][0] != source or task.done():
                self._stop(worker)
        for worker, (source, hasher) in sources.items():
            if worker not in self._tasks:
                sub = KvEventSubscriber(
                    worker, source, self.index, self.metrics, hasher, context=self._ctx
                )
                self._tasks[worker] = (source, asyncio.create_task(sub.run()))
        self.metrics.index_blocks.labels("events").set(self.index.size)

    def restart(self, worker: str) -> None:
        """The worker is a new process: forget its blocks; the next sync resubscribes."""
        self._stop(worker)

    def _stop(self, worker: str) -> None:
        _, task = self._tasks.pop(worker)
        task.cancel()
        self.index.drop_worker(worker)

    async def close(self) -> None:
        tasks = [t for _, t in self._tasks.values()]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
        self._ctx.term()
