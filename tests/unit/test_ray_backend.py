"""The Ray backend without a Ray runtime: the launcher's pools exchanging with the real
registry (behind a stub actor handle; workers are real sleeping processes), the Ray
scaler resizing through it, placement bundles, and the CLI and config checks."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pdserve.autoscale.ray_scaler import RayScaler
from pdserve.autoscale.scaler import PoolSize
from pdserve.cli import app
from pdserve.config import RayConfig, Role
from pdserve.deploy.local.pools import State
from pdserve.deploy.ray.actors import ClusterRegistry
from pdserve.deploy.ray.launcher import RayContext, RayPools, worker_address_of
from pdserve.errors import ConfigError, ScalingError
from tests.unit.ray_stubs import StubActor, stub_ray_get
from tests.unit.test_scaling_local import Workers, address


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    w = Workers(tmp_path)
    yield w
    w.stop_all()


@pytest.fixture
def cluster(
    workers: Workers, monkeypatch: pytest.MonkeyPatch
) -> tuple[RayPools, ClusterRegistry, list[str]]:
    """1 prefill + 1 decode, both ready, behind a registry."""
    stub_ray_get(monkeypatch)
    registry = ClusterRegistry()
    said: list[str] = []
    pools = RayPools(StubActor(registry), workers.build, said.append, address)
    for slot, role in enumerate((Role.PREFILL, Role.DECODE)):
        c = workers.build(role, f"{role.value}-0", slot)
        c.start()
        workers.ready.add(c.name)
        pools.adopt(c, role, slot)
    pools.reconcile()
    return pools, registry, said


def wait_for(condition: object, pools: RayPools, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        pools.reconcile()
        time.sleep(0.02)


def test_the_launcher_publishes_membership_and_view(
    cluster: tuple[RayPools, ClusterRegistry, list[str]],
) -> None:
    pools, registry, _ = cluster
    doc = registry.sync(0, {})
    assert doc["members"]["prefill"] == [address(0)]
    assert doc["members"]["decode"] == [address(1)]
    assert doc["version"] == pools.version > 0
    assert registry.describe()["pools"]["decode"]["serving"] == 1


def test_scale_down_waits_for_the_router_report_through_the_registry(
    cluster: tuple[RayPools, ClusterRegistry, list[str]], workers: Workers
) -> None:
    pools, registry, said = cluster
    pools.set_target(Role.DECODE, 2)
    workers.ready.add("decode-1")
    wait_for(lambda: address(2) in registry.sync(0, {})["members"]["decode"], pools)
    pools.set_target(Role.DECODE, 1)
    pools.reconcile()
    left_at = registry.sync(0, {})["version"]
    assert address(2) not in registry.sync(0, {})["members"]["decode"]
    # The router has applied the change but still runs a request on decode-1.
    registry.sync(left_at, {address(2): 1})
    for _ in range(10):
        pools.reconcile()
    assert [m.state for m in pools.members if m.role is Role.DECODE][-1] is State.LEAVING
    registry.sync(left_at, {})
    wait_for(lambda: len(pools.members) == 2, pools)
    assert "decode-1 drained by the router; stopping it" in said


@pytest.fixture
def launcher(
    cluster: tuple[RayPools, ClusterRegistry, list[str]],
) -> Iterator[tuple[RayPools, RayScaler]]:
    """The launcher's supervise loop in a thread; the scaler talks to the registry."""
    pools, registry, _ = cluster
    stop = threading.Event()

    def supervise() -> None:
        while not stop.is_set():
            pools.reconcile()
            time.sleep(0.02)

    thread = threading.Thread(target=supervise, daemon=True)
    thread.start()
    yield pools, RayScaler(StubActor(registry), timeout_s=5)
    stop.set()
    thread.join(timeout=5)


def test_ray_scaler_resizes_through_the_registry(
    launcher: tuple[RayPools, RayScaler], workers: Workers
) -> None:
    pools, scaler = launcher
    assert scaler.sizes()[Role.DECODE] == PoolSize(1, 1)
    workers.ready.add("decode-1")
    scaler.scale(Role.DECODE, 2)
    assert pools.targets[Role.DECODE] == 2  # applied by the launcher before it returned
    view = scaler.wait_settled(timeout_s=10, poll_s=0.05)
    assert view["pools"]["decode"]["serving"] == 2
    assert scaler.sizes()[Role.DECODE] == PoolSize(2, 2)


def test_ray_scaler_reports_what_the_launcher_refused(
    launcher: tuple[RayPools, RayScaler],
) -> None:
    pools, scaler = launcher
    with pytest.raises(ConfigError, match="at least one decode"):
        scaler.scale(Role.DECODE, 0)
    assert pools.targets[Role.DECODE] == 1


def test_ray_scaler_fails_clearly_without_a_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    stub_ray_get(monkeypatch)
    registry = ClusterRegistry()  # nobody publishes nor applies
    scaler = RayScaler(StubActor(registry), timeout_s=0.3)
    with pytest.raises(ScalingError, match="not published"):
        scaler.sizes()
    with pytest.raises(ScalingError, match="did not take the request"):
        scaler.scale(Role.DECODE, 2)


def test_placement_bundles_reserve_a_cpu_per_rank_on_the_launchers_node() -> None:
    bundles = RayContext("node:127.0.0.1").bundles(4)  # TP 2 x PP 2
    assert len(bundles) == 4
    assert all(b["CPU"] == 1.0 and b["node:127.0.0.1"] > 0 for b in bundles)
    assert worker_address_of(["x", "--port", "25100", "--metrics-port", "25200"]) == (
        "127.0.0.1:25100"
    )


def test_config_and_cli_refuse_what_cannot_work() -> None:
    with pytest.raises(ConfigError):
        RayConfig(namespace="")
    with pytest.raises(ConfigError):
        RayConfig(num_cpus=-1)
    result = CliRunner().invoke(app, ["up", "--backend", "slurm"])
    assert result.exit_code != 0
    assert "local or ray" in result.output
