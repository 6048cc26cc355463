"""Discovery through Ray: the registry actor of a `pdserve up --backend ray` cluster.

The launcher publishes the pools' membership in a named ``ClusterRegistry`` actor
(deploy/ray/actors.py) in the cluster's Ray namespace. Every ``interval_s`` the router
calls its ``sync``, with the same report as the launcher discovery (the membership
version it applied, its requests in flight per worker), and applies the membership it
gets back: the router-side half of a drain works as with `pdserve up` locally.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from pdserve.config import DiscoveryConfig
from pdserve.router.backoff import Backoff
from pdserve.router.discovery.base import Discovery
from pdserve.router.discovery.launcher import follow_membership
from pdserve.router.workers import WorkerPool

log = logging.getLogger(__name__)

# Returns the registry actor's handle (blocking: runs in a thread).
Connect = Callable[[], Any]


def connect_ray(config: DiscoveryConfig) -> Connect:
    """Join the Ray cluster as a driver in the cluster's namespace and find its registry."""

    def connect() -> Any:
        import ray

        from pdserve.deploy.ray.actors import REGISTRY_NAME

        if not ray.is_initialized():
            ray.init(
                address=config.ray_address,
                namespace=config.ray_namespace,
                log_to_driver=False,
                include_dashboard=False,
            )
        return ray.get_actor(REGISTRY_NAME)

    return connect


class RayDiscovery(Discovery):
    def __init__(
        self,
        connect: Connect,
        interval_s: float = 0.5,
        retry_max_s: float = 10.0,
        call_timeout_s: float = 5.0,
    ) -> None:
        self.connect = connect
        self.interval_s = interval_s
        self.retry_max_s = retry_max_s
        self.call_timeout_s = call_timeout_s

    async def run(self, pool: WorkerPool) -> None:
        registry: Any = None

        async def exchange(applied: int, in_flight: dict[str, int]) -> Any:
            nonlocal registry
            if registry is None:
                registry = await asyncio.to_thread(self.connect)
            ref = registry.sync.remote(applied, in_flight)
            return await asyncio.wait_for(_awaitable(ref), self.call_timeout_s)

        def forget_registry() -> None:
            nonlocal registry
            registry = None

        # Not found yet (the launcher starts the registry first), gone, or Ray's own errors
        # (actor died, timeouts): keep the members we have and look for the registry again.
        await follow_membership(
            pool,
            exchange,
            Backoff(self.interval_s, self.retry_max_s),
            self.interval_s,
            (Exception,),
            "ray registry",
            forget_registry,
        )


async def _awaitable(ref: Any) -> Any:
    return await ref
