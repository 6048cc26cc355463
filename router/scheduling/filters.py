"""Filters: which candidates may take a request at all."""

from __future__ import annotations

import abc
from collections.abc import Sequence

from pdserve.kv_transfer.wire import layout_from_proto
from pdserve.router.scheduling.request import SchedulingRequest
from pdserve.router.workers import WorkerClient
from pdserve.v1 import worker_pb2 as pb

# Layout fields that must be equal on both sides of a KV transfer (KvLayout.mismatches
# with a reshaping transport); parallel shapes are the transport's business.
COMPAT_FIELDS = (
    "model_id",
    "dtype",
    "block_size",
    "num_layers",
    "num_kv_heads",
    "head_size",
    "hash_algorithm",
)
MAX_CACHED_INFOS = 4096


class Filter(abc.ABC):
    name: str

    @abc.abstractmethod
    def filter(
        self, candidates: Sequence[WorkerClient], request: SchedulingRequest
    ) -> list[WorkerClient]:
        """The subset of ``candidates`` that may serve ``request``, in the same order."""


class HealthyFilter(Filter):
    name = "healthy"

    def filter(
        self, candidates: Sequence[WorkerClient], request: SchedulingRequest
    ) -> list[WorkerClient]:
        return [w for w in candidates if w.routable]  # health checks + circuit breaker


class RoleFilter(Filter):
    name = "role"

    def filter(
        self, candidates: Sequence[WorkerClient], request: SchedulingRequest
    ) -> list[WorkerClient]:
        return [w for w in candidates if w.role in request.roles]


class ModelFilter(Filter):
    """Only workers that said (GetInfo) they serve the router's model."""

    name = "model"

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id

    def filter(
        self, candidates: Sequence[WorkerClient], request: SchedulingRequest
    ) -> list[WorkerClient]:
        return [w for w in candidates if w.info is not None and w.info.model_id == self.model_id]


class KvCompatFilter(Filter):
    """Only workers whose KV layout can exchange KV with ``request.peer`` (the worker
    chosen for the other stage). Parallel shapes may differ: transports reshape them;
    everything else must be equal (the same fields the KV handle check compares)."""

    name = "kv_compat"

    def __init__(self) -> None:
        # id(info) -> (info, key): a worker's info changes only when it (re)joins.
        self._keys: dict[int, tuple[pb.WorkerInfo, tuple[object, ...] | None]] = {}

    def _key(self, worker: WorkerClient) -> tuple[object, ...] | None:
        info = worker.info
        if info is None:
            return None
        cached = self._keys.get(id(info))
        if cached is not None and cached[0] is info:
            return cached[1]
        key = None
        if info.HasField("kv_layout"):
            layout = layout_from_proto(info.kv_layout)
            key = tuple(getattr(layout, f) for f in COMPAT_FIELDS)
        if len(self._keys) > MAX_CACHED_INFOS:
            self._keys.clear()
        self._keys[id(info)] = (info, key)
        return key

    def filter(
        self, candidates: Sequence[WorkerClient], request: SchedulingRequest
    ) -> list[WorkerClient]:
        peer = None if request.peer is None else self._key(request.peer)
        if peer is None:
            return list(candidates)
        keys = [self._key(w) for w in candidates]
        return [w for w, k in zip(candidates, keys, strict=True) if k is None or k == peer]
