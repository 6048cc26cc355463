"""The router's view of its workers: connections, identity, health and load."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import grpc

from pdserve.config import HealthConfig, Role, TlsConfig
from pdserve.grpc_options import CHANNEL_OPTIONS
from pdserve.router.health import CircuitBreaker
from pdserve.tls import aio_channel, handshake_problem
from pdserve.v1 import worker_pb2 as pb
from pdserve.v1 import worker_pb2_grpc

log = logging.getLogger(__name__)
# How long a removed worker's requests may run on before its channel closes: a leaving
# pod drains for up to 30 s (WorkerConfig.drain_timeout_s).
REMOVED_CHANNEL_GRACE_S = 30.0

_ROLE_FROM_PROTO = {
    pb.ROLE_PREFILL: Role.PREFILL,
    pb.ROLE_DECODE: Role.DECODE,
    pb.ROLE_BOTH: Role.BOTH,
}


@dataclass
class WorkerClient:
    """One worker as the router sees it. ``role`` is what discovery said; the worker's
    own GetInfo answer must agree before it receives traffic."""

    address: str
    role: Role
    channel: grpc.aio.Channel
    stub: worker_pb2_grpc.WorkerStub
    info: pb.WorkerInfo | None = None
    healthy: bool = False
    load: pb.LoadReport = field(default_factory=pb.LoadReport)
    in_flight: int = 0  # requests this router has on the worker now
    failed_polls: int = 0  # consecutive polls without an answer
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)

    @classmethod
    def connect(cls, address: str, role: Role, tls: TlsConfig | None = None) -> WorkerClient:
        channel = aio_channel(address, tls, CHANNEL_OPTIONS)
        return cls(address, role, channel, worker_pb2_grpc.WorkerStub(channel))

    @property
    def routable(self) -> bool:
        """May get new requests: answers its health checks and its circuit is closed."""
        return self.healthy and self.breaker.allows_traffic()

    @property
    def name(self) -> str:
        return self.info.worker_id if self.info else self.address


class WorkerPool:
    """All workers, polled for identity, health and load."""

    def __init__(
        self,
        model_id: str,
        rpc_timeout_s: float,
        poll_interval_s: float,
        unhealthy_after_failed_polls: int = 3,
        health: HealthConfig | None = None,
        tls: TlsConfig | None = None,
    ) -> None:
        self.health = health or HealthConfig()
        self.tls = tls
        self.model_id = model_id
        # One slow poll on a busy machine is not an outage: only consecutive misses count.
        self.unhealthy_after_failed_polls = unhealthy_after_failed_polls
        self.rpc_timeout_s = rpc_timeout_s
        self.poll_interval_s = poll_interval_s
        self.workers: list[WorkerClient] = []
        self._task: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()

    def add(self, addresses: Iterable[str], role: Role) -> None:
        for address in addresses:
            client = WorkerClient.connect(address, role, self.tls)
            client.breaker = CircuitBreaker(self.health, name=address)
            self.workers.append(client)

    def remove(self, address: str, role: Role | None = None) -> None:
        """Stop routing to the worker at ``address`` (of ``role``, if given) now and close
        its channel; requests already running there get REMOVED_CHANNEL_GRACE_S to finish."""

        def leaves(w: WorkerClient) -> bool:
            return w.address == address and role in (None, w.role)

        leaving = [w for w in self.workers if leaves(w)]
        self.workers[:] = [w for w in self.workers if not leaves(w)]
        for worker in leaving:
            worker.healthy = False
            task = asyncio.create_task(worker.channel.close(grace=REMOVED_CHANNEL_GRACE_S))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def healthy(self, *roles: Role) -> list[WorkerClient]:
        return [w for w in self.workers if w.routable and w.role in roles]

    @property
    def max_model_len(self) -> int | None:
        lens = [w.info.max_model_len for w in self.workers if w.info is not None]
        return min(lens) if lens else None

    async def poll_once(self) -> None:
        await asyncio.gather(*(self._poll(w) for w in self.workers))

    async def _poll(self, worker: WorkerClient) -> None:
        try:
            if worker.info is None:
                info = await worker.stub.GetInfo(pb.GetInfoRequest(), timeout=self.rpc_timeout_s)
                problem = self._identity_problem(worker, info)
                if problem:
                    if worker.healthy or worker.info is None:
                        log.error("worker %s refused: %s", worker.address, problem)
                    worker.healthy = False
                    return
                worker.info = info
                log.info(
                    "worker %s at %s joined as %s", info.worker_id, worker.address, worker.role
                )
            # The health check's own deadline: a hung worker misses it (circuit breaker).
            worker.load = await worker.stub.GetLoad(
                pb.GetLoadRequest(), timeout=self.health.check_timeout_s
            )
            worker.breaker.record_success()
            worker.failed_polls = 0
            worker.healthy = not worker.load.draining
        except grpc.aio.AioRpcError as e:
            worker.breaker.record_failure(f"health check: {e.code().name}")
            worker.failed_polls += 1
            problem = handshake_problem(e, self.tls)
            if problem and worker.failed_polls == 1:
                log.error("worker %s: %s", worker.address, problem)
            if worker.failed_polls < self.unhealthy_after_failed_polls:
                return
            if worker.healthy:
                log.warning(
                    "worker %s unhealthy after %d failed polls: %s",
                    worker.name,
                    worker.failed_polls,
                    e.code().name,
                )
            worker.healthy = False
            # Re-read the identity when it comes back: it may be a new process.
            worker.info = None

    def _identity_problem(self, worker: WorkerClient, info: pb.WorkerInfo) -> str | None:
        role = _ROLE_FROM_PROTO.get(info.role)
        if role != worker.role:
            return f"it reports role {role}, discovery says {worker.role}"
        if info.model_id != self.model_id:
            return f"it serves model {info.model_id!r}, the router serves {self.model_id!r}"
        return None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await self.poll_once()
            await asyncio.sleep(self.poll_interval_s)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await asyncio.gather(*(w.channel.close() for w in self.workers), return_exceptions=True)
