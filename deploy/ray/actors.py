"""What runs inside Ray actors: one supervisor per worker, one registry per cluster.

Both are plain classes; ``deploy/ray/launcher.py`` turns them into actors with
``ray.remote`` (so they can be tested without a Ray runtime).

* ``WorkerSupervisor`` starts the same `pdserve worker` process the local backend runs
  (its own process group, SIGTERM when the actor process dies: PR_SET_PDEATHSIG) and
  answers for it: exit code, gRPC health, signals, log tail.
* ``ClusterRegistry`` is the cluster's meeting point in its Ray namespace: the launcher
  publishes the pools' membership and view there, the router's Ray discovery syncs with
  it (the same exchange as the local control endpoint's /v1/discovery/sync: the router
  reports the membership version it applied and its requests in flight per worker), and
  `pdserve scale --backend ray` leaves resize requests there that the launcher applies.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from pdserve.config import Role
from pdserve.deploy.local.launcher import Component
from pdserve.deploy.local.probes import grpc_serving

# The name of a cluster's registry actor in its namespace.
REGISTRY_NAME = "pdserve-registry"
# Worker supervisor actors are named WORKER_PREFIX + worker name (e.g. decode-1).
WORKER_PREFIX = "pdserve-worker-"


class WorkerSupervisor:
    """Runs one `pdserve worker` process (``argv``) and reports on it."""

    def __init__(
        self, name: str, argv: list[str], env: dict[str, str], log_path: str, address: str
    ) -> None:
        self.address = address
        self._component = Component(
            name, argv, Path(log_path), lambda: grpc_serving(address), env=env
        )
        self._component.start()

    def pid(self) -> int:
        assert self._component.proc is not None
        return self._component.proc.pid

    def exit_code(self) -> int | None:
        return self._component.exit_code()

    def ready(self) -> bool:
        return self._component.exit_code() is None and self._component.is_ready()

    def signal(self, sig: int) -> None:
        self._component.signal_group(sig)

    def log_tail(self, lines: int = 15) -> str:
        return self._component.log_tail(lines)


class ClusterRegistry:
    """Membership, the router's reports and pending resize requests of one cluster."""

    def __init__(self) -> None:
        self._membership: dict[str, Any] = {
            "version": 0,
            "members": {role.value: [] for role in Role},
        }
        self._view: dict[str, Any] = {"version": 0, "pools": {}}
        self._applied = 0
        self._in_flight: dict[str, int] = {}
        self._ids = itertools.count(1)
        self._requests: list[tuple[int, str, int]] = []
        self._results: dict[int, str] = {}  # request id -> "" (done) or the error

    # -- the router's Ray discovery ---------------------------------------------------

    def sync(self, applied: int, in_flight: dict[str, int]) -> dict[str, Any]:
        self._applied = int(applied)
        self._in_flight = {str(k): int(v) for k, v in in_flight.items()}
        return self._membership

    # -- the launcher -----------------------------------------------------------------

    def exchange(
        self, membership: dict[str, Any], view: dict[str, Any]
    ) -> tuple[int, dict[str, int], list[tuple[int, str, int]]]:
        """Publish the pools; get the router's last report and the resize requests
        that arrived since the last call."""
        self._membership, self._view = membership, view
        requests, self._requests = self._requests, []
        return self._applied, dict(self._in_flight), requests

    def publish(self, view: dict[str, Any]) -> None:
        """A new view (targets changed) between two exchanges."""
        self._view = view

    def resolved(self, request_id: int, error: str) -> None:
        self._results[request_id] = error

    # -- `pdserve scale --backend ray` (pdserve/autoscale/ray.py) ----------------------

    def describe(self) -> dict[str, Any]:
        return self._view

    def request_scale(self, role: str, replicas: int) -> int:
        request_id = next(self._ids)
        self._requests.append((request_id, Role(role).value, int(replicas)))
        return request_id

    def result(self, request_id: int) -> str | None:
        """None while the launcher has not applied the request; then "" or the error."""
        return self._results.pop(request_id, None)
