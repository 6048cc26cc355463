"""The worker pools of a running `pdserve up` cluster, resizable while it serves.

Each worker goes through four states::

    STARTING --ready--> SERVING --scale down--> LEAVING --router drained--> STOPPING --> gone

Only SERVING workers are *members*: the router follows the membership through
``sync`` (router/discovery/launcher.py). A worker leaves in two steps so no request is
dropped: first it leaves the membership and the launcher waits until the router has
applied that version and reports no request of its own still running there (router-side
drain); then it gets SIGTERM and drains what is left itself (worker-side drain, in
pdserve/worker/server.py) before it exits.

Thread safety: the control endpoint's threads and the launcher's supervise loop share
one ``Pools``; every public method takes its lock. Readiness probes run outside it.
"""

from __future__ import annotations

import enum
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pdserve.config import Role
from pdserve.errors import ConfigError

if TYPE_CHECKING:
    from pdserve.deploy.local.launcher import Component

# How long a leaving worker waits for the router to drain it before it is stopped anyway
# (the router may be gone or wedged; the worker still drains its own requests).
ROUTER_DRAIN_TIMEOUT_S = 120.0
# Worker-side drain (WorkerConfig.drain_timeout_s) plus engine shutdown.
WORKER_STOP_TIMEOUT_S = 60.0


class State(enum.StrEnum):
    STARTING = "starting"
    SERVING = "serving"
    LEAVING = "leaving"
    STOPPING = "stopping"


@dataclass
class Member:
    component: Component
    role: Role
    slot: int  # selects the worker's ports
    address: str
    state: State = State.STARTING
    since: float = field(default_factory=time.monotonic)
    left_at_version: int = 0  # the membership version in which it left


# Builds a worker component: (role, name, slot) -> Component.
WorkerFactory = Callable[[Role, str, int], "Component"]


class Pools:
    """Targets and members of the prefill, decode and colocated pools."""

    def __init__(
        self,
        factory: WorkerFactory,
        say: Callable[[str], None],
        address_of: Callable[[int], str],
        router_drain_timeout_s: float = ROUTER_DRAIN_TIMEOUT_S,
        worker_stop_timeout_s: float = WORKER_STOP_TIMEOUT_S,
    ) -> None:
        self._factory = factory
        self._say = say
        self._address_of = address_of
        self.router_drain_timeout_s = router_drain_timeout_s
        self.worker_stop_timeout_s = worker_stop_timeout_s
        self._lock = threading.RLock()
        self.members: list[Member] = []
        self.targets: dict[Role, int] = dict.fromkeys(Role, 0)
        self.version = 0  # bumps whenever the set of SERVING members changes
        self._router_applied = 0
        self._router_in_flight: dict[str, int] = {}

    # -- building -------------------------------------------------------------------

    def adopt(self, component: Component, role: Role, slot: int) -> Member:
        """Take an already planned worker (the cluster's initial ones)."""
        with self._lock:
            member = Member(component, role, slot, self._address_of(slot))
            self.members.append(member)
            self.targets[role] += 1
            return member

    @property
    def components(self) -> list[Component]:
        with self._lock:
            return [m.component for m in self.members]

    # -- the control endpoint's side ------------------------------------------------

    def set_target(self, role: Role, replicas: int) -> None:
        if replicas < 0:
            raise ConfigError(f"replicas must be >= 0, not {replicas}")
        with self._lock:
            wanted = {**self.targets, role: replicas}
            if wanted[Role.DECODE] + wanted[Role.BOTH] == 0:
                raise ConfigError("the cluster needs at least one decode or colocated worker")
            if wanted[Role.PREFILL] and not wanted[Role.DECODE]:
                raise ConfigError("prefill workers need decode workers to hand their KV to")
            if self.targets[role] != replicas:
                self._say(f"scaling {role.value}: {self.targets[role]} -> {replicas} workers")
            self.targets[role] = replicas

    def describe(self) -> dict[str, Any]:
        """The pools as the control endpoint shows them."""
        with self._lock:
            return {
                "version": self.version,
                "pools": {
                    role.value: {
                        "target": self.targets[role],
                        "serving": sum(
                            1 for m in self.members if m.role is role and m.state is State.SERVING
                        ),
                        "workers": [
                            {"name": m.component.name, "address": m.address, "state": m.state}
                            for m in self.members
                            if m.role is role
                        ],
                    }
                    for role in Role
                },
            }

    def sync(self, applied: int, in_flight: dict[str, int]) -> dict[str, Any]:
        """The router reports the membership version it has applied and its requests in
        flight per worker address; it gets the current membership back."""
        with self._lock:
            self._router_applied = applied
            self._router_in_flight = dict(in_flight)
            members: dict[str, list[str]] = {role.value: [] for role in Role}
            for m in self.members:
                if m.state is State.SERVING:
                    members[m.role.value].append(m.address)
            return {"version": self.version, "members": members}

    # -- the supervise loop's side --------------------------------------------------

    def reconcile(self, now: float | None = None) -> None:
        """One step toward the targets: start, promote, drain and stop workers."""
        self._promote_ready()
        with self._lock:
            now = time.monotonic() if now is None else now
            self._reap_exited()
            for role in Role:
                self._resize(role)
            for m in self.members:
                if m.state is State.LEAVING and self._router_drained(m, now):
                    self._say(f"{m.component.name} drained by the router; stopping it")
                    m.component.signal_group(signal.SIGTERM)
                    m.state, m.since = State.STOPPING, now
                elif m.state is State.STOPPING and now - m.since > self.worker_stop_timeout_s:
                    m.component.signal_group(signal.SIGKILL)

    def _promote_ready(self) -> None:
        with self._lock:
            starting = [m for m in self.members if m.state is State.STARTING]
        # A worker that answered its probe once (the launcher's first wait) stays ready: a
        # probe that times out later on busy cores must not keep it out of the pool.
        ready = [
            m
            for m in starting
            if m.component.exit_code() is None and (m.component.ready or m.component.is_ready())
        ]
        with self._lock:
            for m in ready:
                if m.state is State.STARTING:  # (not cancelled meanwhile)
                    m.state, m.since = State.SERVING, time.monotonic()
                    m.component.ready = True
                    self.version += 1
                    self._say(f"{m.component.name} ready at {m.address}; joined the {m.role} pool")

    def _reap_exited(self) -> None:
        for m in list(self.members):
            code = m.component.exit_code()
            if code is None:
                continue
            self.members.remove(m)
            if m.state is State.STOPPING:
                self._say(f"{m.component.name} stopped")
                continue
            if m.state is State.SERVING:
                self.version += 1
            # Not asked to stop: report it and do not restart it (a crash loop helps no
            # one); the pool's target follows what is left.
            self.targets[m.role] = max(0, self.targets[m.role] - 1)
            self._say(f"{m.component.name} exited with code {code}; last lines of its log:")
            self._say(m.component.log_tail())

    def _resize(self, role: Role) -> None:
        live = [
            m for m in self.members if m.role is role and m.state in (State.STARTING, State.SERVING)
        ]
        missing = self.targets[role] - len(live)
        for _ in range(missing):
            self._start(role)
        # Too many: cancel the newest starting workers first, then the last serving ones.
        excess = sorted(live, key=lambda m: (m.state is State.SERVING, -m.slot))[: max(0, -missing)]
        for m in excess:
            if m.state is State.STARTING:
                self._say(f"{m.component.name} no longer needed; stopping it")
                m.component.signal_group(signal.SIGTERM)
                m.state = State.STOPPING
            else:
                self.version += 1
                m.state, m.left_at_version = State.LEAVING, self.version
                self._say(f"{m.component.name} leaves the {role} pool; draining")
            m.since = time.monotonic()

    def _start(self, role: Role) -> None:
        used_slots = {m.slot for m in self.members}
        slot = next(s for s in range(len(used_slots) + 1) if s not in used_slots)
        names = {m.component.name for m in self.members}
        index = next(i for i in range(len(names) + 1) if f"{role.value}-{i}" not in names)
        component = self._factory(role, f"{role.value}-{index}", slot)
        component.start()
        self.members.append(Member(component, role, slot, self._address_of(slot)))
        self._say(f"starting {component.name} at {self._address_of(slot)}")

    def _router_drained(self, m: Member, now: float) -> bool:
        if now - m.since > self.router_drain_timeout_s:
            self._say(f"{m.component.name}: the router did not drain it in time")
            return True
        return (
            self._router_applied >= m.left_at_version
            and self._router_in_flight.get(m.address, 0) == 0
        )

    def settled(self) -> bool:
        """Every pool has exactly its target of SERVING workers and nothing in between."""
        with self._lock:
            for role in Role:
                states = [m.state for m in self.members if m.role is role]
                if states.count(State.SERVING) != self.targets[role] or len(states) != len(
                    [s for s in states if s is State.SERVING]
                ):
                    return False
            return True
