"""The router's Ray discovery (router/discovery/ray.py) against the real registry
(deploy/ray/actors.py) behind a stub actor handle: members join and leave as the
launcher publishes them, the router's drain report reaches the launcher, and a registry
that cannot be reached keeps the members the router has."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
import typer

from pdserve.config import DiscoveryConfig, DiscoveryMode, Role, RouterConfig
from pdserve.deploy.ray.actors import ClusterRegistry
from pdserve.errors import ConfigError
from pdserve.router.app import _discovery
from pdserve.router.cli import discovery_from_config
from pdserve.router.discovery.ray import RayDiscovery
from pdserve.router.workers import WorkerPool
from tests.unit.ray_stubs import StubActor

P0, D0, D1 = "127.0.0.1:25100", "127.0.0.1:25101", "127.0.0.1:25102"


def membership(version: int, prefill: list[str], decode: list[str]) -> dict[str, Any]:
    return {"version": version, "members": {"prefill": prefill, "decode": decode, "both": []}}


async def until(condition: Callable[[], bool], timeout_s: float = 5) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def members(pool: WorkerPool) -> set[tuple[Role, str]]:
    return {(w.role, w.address) for w in pool.workers}


async def test_router_follows_the_registry_and_reports_its_drain() -> None:
    registry = ClusterRegistry()
    actor = StubActor(registry)
    pool = WorkerPool("m", rpc_timeout_s=1, poll_interval_s=1)
    task = asyncio.create_task(RayDiscovery(lambda: actor, interval_s=0.01).run(pool))
    try:
        registry.exchange(membership(1, [P0], [D0, D1]), {})
        await until(
            lambda: members(pool) == {(Role.PREFILL, P0), (Role.DECODE, D0), (Role.DECODE, D1)}
        )
        # A request of the router's own runs on D1 when the launcher takes it away.
        leaving = next(w for w in pool.workers if w.address == D1)
        leaving.in_flight = 1
        registry.exchange(membership(2, [P0], [D0]), {})
        await until(lambda: (Role.DECODE, D1) not in members(pool))
        await until(lambda: registry.exchange(membership(2, [P0], [D0]), {})[0] == 2)
        applied, in_flight, _ = registry.exchange(membership(2, [P0], [D0]), {})
        assert (applied, in_flight[D1]) == (2, 1)  # applied, but still running there
        leaving.in_flight = 0
        await until(lambda: D1 not in registry.exchange(membership(2, [P0], [D0]), {})[1])
    finally:
        task.cancel()
        await pool.close()


async def test_keeps_its_members_while_the_registry_is_unreachable_then_catches_up() -> None:
    registry = ClusterRegistry()
    registry.exchange(membership(3, [P0], [D1]), {})
    actor = StubActor(registry)
    attempts = 0

    def connect() -> StubActor:
        nonlocal attempts
        attempts += 1
        if attempts <= 2:
            raise ValueError("Failed to look up actor 'pdserve-registry'")  # (as Ray says)
        return actor

    pool = WorkerPool("m", rpc_timeout_s=1, poll_interval_s=1)
    pool.add([D0], Role.DECODE)
    discovery = RayDiscovery(connect, interval_s=0.01, retry_max_s=0.02)
    task = asyncio.create_task(discovery.run(pool))
    try:
        await until(lambda: attempts >= 2)
        assert members(pool) == {(Role.DECODE, D0)}
        await until(lambda: members(pool) == {(Role.PREFILL, P0), (Role.DECODE, D1)})
        # The actor dies: calls fail, the router keeps its members and reconnects.
        actor.error = RuntimeError("The actor died unexpectedly")
        before = attempts
        await until(lambda: attempts > before + 1)
        assert members(pool) == {(Role.PREFILL, P0), (Role.DECODE, D1)}
        assert not task.done()
    finally:
        task.cancel()
        await pool.close()


def test_ray_mode_needs_an_address_and_selects_the_ray_source() -> None:
    with pytest.raises(ConfigError, match="ray-address"):
        DiscoveryConfig(mode=DiscoveryMode.RAY)
    config = DiscoveryConfig(mode=DiscoveryMode.RAY, ray_address="127.0.0.1:25300")
    assert config.ray_namespace == "pdserve"
    source = _discovery(RouterConfig(model_path="m", served_model_name="m", discovery=config))
    assert isinstance(source, RayDiscovery)


def test_router_command_line_selects_ray_discovery() -> None:
    config = discovery_from_config(
        DiscoveryMode.RAY, None, ray_address="127.0.0.1:25300", ray_namespace="ns"
    )
    assert (config.mode, config.ray_address, config.ray_namespace) == (
        DiscoveryMode.RAY,
        "127.0.0.1:25300",
        "ns",
    )
    with pytest.raises(typer.BadParameter, match="ray-address"):
        discovery_from_config(DiscoveryMode.RAY, None)
