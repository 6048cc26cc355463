"""Context-aware routing, assembled: prefix indexes, per-pool policies, the planner, and
the loop that keeps the event index subscribed to every worker that publishes events."""

from __future__ import annotations

import asyncio
import logging
import random
from urllib.parse import urlsplit

from pdserve.errors import ConfigError
from pdserve.metrics import RoutingMetrics
from pdserve.router.kv_index.hashing import BlockHasher
from pdserve.router.kv_index.index import PrefixIndex
from pdserve.router.kv_index.lookup import EventPrefixLookup, RoutedPrefixLookup
from pdserve.router.kv_index.subscriber import EventSource, KvEventHub
from pdserve.router.load_watch import LoadWatcher
from pdserve.router.planner import Planner
from pdserve.router.scheduling.cost import TransferCostModel
from pdserve.router.scheduling.policy import PolicyDeps, build_policy
from pdserve.router.workers import WorkerClient, WorkerPool
from pdserve.scheduling_config import SchedulingConfig
from pdserve.v1 import worker_pb2 as pb

log = logging.getLogger(__name__)
# How often worker joins, leaves and restarts are reflected in the event subscriptions.
SYNC_INTERVAL_S = 0.5


def event_source(worker: WorkerClient) -> EventSource | None:
    """The worker's KV event endpoints; a wildcard host means the worker's own address."""
    info = worker.info
    if info is None or not info.kv_events_endpoint:
        return None
    host = worker.address.rsplit(":", 1)[0]

    def resolve(endpoint: str) -> str:
        parts = urlsplit(endpoint)
        if parts.hostname in ("*", "0.0.0.0", "::", None):
            return f"{parts.scheme}://{host}:{parts.port}"
        return endpoint

    replay = info.kv_events_replay_endpoint
    return EventSource(resolve(info.kv_events_endpoint), resolve(replay) if replay else None)


class Routing:
    def __init__(
        self,
        config: SchedulingConfig,
        pool: WorkerPool,
        metrics: RoutingMetrics | None,
        model_id: str | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.pool = pool
        self.metrics = metrics
        self.events = EventPrefixLookup(PrefixIndex())
        self.approximate = RoutedPrefixLookup()
        d = config.disaggregation
        deps = PolicyDeps(
            model_id=model_id,
            events=self.events,
            approximate=self.approximate,
            cost=TransferCostModel(d.link_bytes_per_s, d.prefill_tokens_per_s, d.overhead_s),
            metrics=metrics,
            rng=rng,
        )
        self.planner = Planner(
            pool,
            build_policy(config.prefill, "prefill", deps),
            build_policy(config.decode, "decode", deps),
            d,
            metrics,
        )
        self.hub = KvEventHub(self.events.index, metrics) if metrics is not None else None
        self.loads = LoadWatcher(pool)
        # The identity each worker had when subscribed (a new object: it re-joined).
        self._infos: dict[str, pb.WorkerInfo] = {}
        self._hasher_problem: str | None = None

    def sync(self) -> None:
        """Subscribe to workers that joined, drop those that left or restarted."""
        sources: dict[str, tuple[EventSource, BlockHasher | None]] = {}
        for w in self.pool.workers:
            source = event_source(w)
            if source is None:
                continue
            assert w.info is not None
            known = self._infos.get(w.address)
            if known is not None and known is not w.info and self.hub is not None:
                self.hub.restart(w.address)  # re-read identity: possibly a new process
            self._infos[w.address] = w.info
            sources[w.address] = (source, self._hasher_for(w))
        for address in set(self._infos) - set(sources):
            del self._infos[address]
        if self.hub is not None:
            self.hub.sync(sources)
        self.loads.sync()

    def _hasher_for(self, worker: WorkerClient) -> BlockHasher | None:
        assert worker.info is not None
        layout = worker.info.kv_layout
        current = self.events.hasher
        if current is not None and (current.block_size, current.algorithm) == (
            layout.block_size,
            layout.hash_algorithm.removeprefix("vllm-"),
        ):
            return current
        try:
            hasher = BlockHasher(layout.block_size, layout.hash_algorithm)
        except ConfigError as e:
            if self._hasher_problem != e.message:
                self._hasher_problem = e.message
                log.error("worker %s: no exact prefix routing: %s", worker.name, e.message)
            return None
        if current is None:
            self.events.use_hasher(hasher)
            log.info("prefix index: block size %d, hash %s", hasher.block_size, hasher.algorithm)
        return hasher

    async def run(self) -> None:
        while True:
            self.sync()
            await asyncio.sleep(SYNC_INTERVAL_S)

    async def close(self) -> None:
        await self.loads.close()
        if self.hub is not None:
            await self.hub.close()
