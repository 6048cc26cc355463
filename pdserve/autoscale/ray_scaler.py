"""The Ray backend of the scaling interface: a `pdserve up --backend ray` cluster,
found through Ray (its registry actor in the cluster's namespace), from any node.

The view and the targets are the launcher's (the same document its control endpoint
serves); a resize request is left at the registry and applied by the launcher on its
next step, which also answers whether it was accepted.
"""

from __future__ import annotations

import time
from typing import Any

from pdserve.autoscale.scaler import LauncherScaler
from pdserve.config import Role
from pdserve.errors import ConfigError, ScalingError

# How often to look whether the launcher has applied a request.
POLL_S = 0.2


class RayScaler(LauncherScaler):
    """``registry``: the cluster's ``ClusterRegistry`` actor handle (``connect``)."""

    def __init__(self, registry: Any, timeout_s: float = 10.0) -> None:
        super().__init__(url="ray", timeout_s=timeout_s)
        self.registry = registry

    @classmethod
    def connect(cls, address: str, namespace: str, timeout_s: float = 10.0) -> RayScaler:
        import ray

        from pdserve.deploy.ray.actors import REGISTRY_NAME

        try:
            if not ray.is_initialized():
                ray.init(address=address, namespace=namespace, log_to_driver=False)
            return cls(ray.get_actor(REGISTRY_NAME), timeout_s)
        except (ConnectionError, ValueError) as e:
            raise ScalingError(
                f"no pdserve cluster in Ray namespace {namespace!r} at {address}: {e}"
            ) from e

    def describe(self) -> dict[str, Any]:
        view = self._get(self.registry.describe.remote())
        if not isinstance(view, dict) or not view.get("pools"):
            raise ScalingError("the Ray cluster's launcher has not published its pools yet")
        return view

    def scale(self, role: Role, replicas: int) -> None:
        request_id = self._get(self.registry.request_scale.remote(role.value, replicas))
        deadline = time.monotonic() + self.timeout_s
        while (error := self._get(self.registry.result.remote(request_id))) is None:
            if time.monotonic() > deadline:
                raise ScalingError(
                    f"the launcher did not take the request within {self.timeout_s:.0f} s"
                )
            time.sleep(POLL_S)
        if error:
            raise ConfigError(error)

    def _get(self, ref: Any) -> Any:
        import ray
        from ray.exceptions import GetTimeoutError, RayError

        try:
            return ray.get(ref, timeout=self.timeout_s)
        except (GetTimeoutError, RayError) as e:
            raise ScalingError(f"the Ray cluster's registry: {e}") from e
