"""One scaling interface, one backend per way of running pdserve.

* ``LauncherScaler``: a `pdserve up` cluster (local processes, and the Ray backend's
  launcher, which serves the same control API) through its control endpoint.
* ``KubernetesScaler``: the scale subresource of each pool's Deployment or StatefulSet
  (what `kubectl scale` and the HorizontalPodAutoscaler use).
"""

from __future__ import annotations

import abc
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from pdserve.config import Role
from pdserve.errors import ConfigError, ScalingError
from pdserve.k8s import load_api_client

POOLS_PATH = "/v1/pools"


@dataclass(frozen=True)
class PoolSize:
    target: int  # replicas asked for
    ready: int  # replicas serving now


class Scaler(abc.ABC):
    """Reads and sets the replica count of a cluster's pools.

    ``scale`` only records the wish and returns; the backend converges in the background
    (a new worker joins once its engine is ready, a removed one drains first). Callers
    watch ``sizes()`` to see it converge. Both raise ``ScalingError`` on failure.
    """

    @abc.abstractmethod
    def sizes(self) -> dict[Role, PoolSize]:
        """Every pool this backend manages."""

    @abc.abstractmethod
    def scale(self, role: Role, replicas: int) -> None:
        """Ask for ``replicas`` workers in the ``role`` pool."""


class LauncherScaler(Scaler):
    def __init__(self, url: str, timeout_s: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def describe(self) -> dict[str, Any]:
        """The launcher's whole view: targets and each worker's state."""
        return self._call("GET", POOLS_PATH)

    def sizes(self) -> dict[Role, PoolSize]:
        pools = self.describe()["pools"]
        return {
            Role(name): PoolSize(int(pool["target"]), int(pool["serving"]))
            for name, pool in pools.items()
        }

    def scale(self, role: Role, replicas: int) -> None:
        self._call("PUT", f"{POOLS_PATH}/{role.value}", {"replicas": replicas})

    def wait_settled(self, timeout_s: float, poll_s: float = 1.0) -> dict[str, Any]:
        """Wait until every pool serves exactly its target and nothing is starting or
        leaving; returns the final view, raises ScalingError after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            view = self.describe()
            if all(_settled(pool) for pool in view["pools"].values()):
                return view
            if time.monotonic() > deadline:
                raise ScalingError(f"the pools did not settle within {timeout_s:.0f} s: {view}")
            time.sleep(poll_s)

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            reply = httpx.request(method, self.url + path, json=body, timeout=self.timeout_s)
        except httpx.HTTPError as e:
            raise ScalingError(f"cannot reach the launcher at {self.url}: {e}") from e
        try:
            doc = reply.json()
        except ValueError as e:
            raise ScalingError(f"{self.url}{path}: HTTP {reply.status_code}, not JSON") from e
        if reply.status_code >= 400:
            raise ScalingError(f"{self.url}{path}: {doc.get('error', reply.status_code)}")
        if not isinstance(doc, dict):
            raise ScalingError(f"{self.url}{path}: unexpected reply {doc!r}")
        return doc


def _settled(pool: Mapping[str, Any]) -> bool:
    states = [w["state"] for w in pool["workers"]]
    return states.count("serving") == pool["target"] == len(states)


class WorkloadKind:
    DEPLOYMENT = "Deployment"
    STATEFUL_SET = "StatefulSet"


@dataclass(frozen=True)
class Workload:
    kind: str  # WorkloadKind.*
    name: str


class KubernetesScaler(Scaler):
    """Patches ``spec.replicas`` of each pool's workload through its scale subresource.

    ``api`` is an ``AppsV1Api`` (default: in-cluster credentials, else ~/.kube/config).
    The service account needs ``get`` and ``patch`` on ``deployments/scale`` or
    ``statefulsets/scale``. Do not also enable the chart's HorizontalPodAutoscaler for a
    pool this scaler drives: both would write the same field.
    """

    def __init__(
        self, namespace: str, workloads: Mapping[Role, Workload], api: Any | None = None
    ) -> None:
        for w in workloads.values():
            if w.kind not in (WorkloadKind.DEPLOYMENT, WorkloadKind.STATEFUL_SET):
                raise ConfigError(f"cannot scale a {w.kind}; use Deployment or StatefulSet")
        self.namespace = namespace
        self.workloads = dict(workloads)
        self._api = api

    @property
    def api(self) -> Any:
        if self._api is None:
            self._api = _load_apps_api()
        return self._api

    def sizes(self) -> dict[Role, PoolSize]:
        sizes = {}
        for role, w in self.workloads.items():
            scale = self._invoke("read", w)
            ready = (scale.status.replicas if scale.status else 0) or 0
            sizes[role] = PoolSize(int(scale.spec.replicas or 0), int(ready))
        return sizes

    def scale(self, role: Role, replicas: int) -> None:
        if role not in self.workloads:
            raise ConfigError(f"no {role} workload is configured")
        self._invoke("patch", self.workloads[role], {"spec": {"replicas": replicas}})

    def _invoke(self, verb: str, w: Workload, body: dict[str, Any] | None = None) -> Any:
        from kubernetes.client import ApiException  # type: ignore[import-not-found, unused-ignore]

        kind = "deployment" if w.kind == WorkloadKind.DEPLOYMENT else "stateful_set"
        method = getattr(self.api, f"{verb}_namespaced_{kind}_scale")
        args: tuple[Any, ...] = (w.name, self.namespace) + (() if body is None else (body,))
        try:
            return method(*args)
        except ApiException as e:
            raise ScalingError(
                f"{verb} scale of {w.kind} {self.namespace}/{w.name}: {e.status} {e.reason}"
            ) from e
        except OSError as e:  # urllib3 connection errors derive from OSError
            raise ScalingError(f"{verb} scale of {w.kind} {w.name}: {e}") from e


def _load_apps_api() -> Any:
    from kubernetes import client  # type: ignore[import-not-found, unused-ignore]

    return client.AppsV1Api(load_api_client("kubernetes scaler"))
