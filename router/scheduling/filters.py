"""Filters: which candidates may take a request at all."""

from __future__ import annotations

import abc
from collections.abc import Sequence

from pdserve.kv_transfer.wire import layout_from_proto
from pdserve.router.scheduling.request import SchedulingRequest
from pdserve.router.workers import WorkerClient


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
    chosen for the other stage). Parallel shapes may differ: transports reshape."""

    name = "kv_compat"

    def filter(
        self, candidates: Sequence[WorkerClient], request: SchedulingRequest
    ) -> list[WorkerClient]:
        peer = request.peer
        if peer is None or peer.info is None or not peer.info.HasField("kv_layout"):
            return list(candidates)
        mine = layout_from_proto(peer.info.kv_layout)
        return [
            w
            for w in candidates
            if w.info is None
            or not w.info.HasField("kv_layout")
            or not mine.mismatches(layout_from_proto(w.info.kv_layout), transport_reshapes=True)
        ]
