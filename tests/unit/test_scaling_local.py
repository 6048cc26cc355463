"""Resizing a `pdserve up` cluster: the pools' state machine (real child processes stand in
for workers), the control endpoint over HTTP, and the router's launcher discovery
following it, including the router-side drain handshake."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pdserve.autoscale.scaler import LauncherScaler
from pdserve.config import Role
from pdserve.deploy.local.control import serve_control
from pdserve.deploy.local.launcher import Component
from pdserve.deploy.local.pools import Pools, State
from pdserve.errors import ConfigError, ScalingError
from pdserve.router.discovery.launcher import LauncherDiscovery
from pdserve.router.workers import WorkerPool


class Workers:
    """Builds workers that are real sleeping processes; the test decides when each is
    ready."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.ready: set[str] = set()
        self.dying: set[str] = set()  # these exit at once with code 3
        self.built: list[Component] = []

    def build(self, role: Role, name: str, slot: int) -> Component:
        code = "raise SystemExit(3)" if name in self.dying else "import time; time.sleep(120)"
        c = Component(
            name,
            [sys.executable, "-c", code],
            self.log_dir / f"{name}.log",
            lambda: name in self.ready,
            role=role,
            slot=slot,
        )
        self.built.append(c)
        return c

    def stop_all(self) -> None:
        for c in self.built:
            c.signal_group(9)
            if c.proc is not None:
                c.proc.wait(timeout=10)


def address(slot: int) -> str:
    return f"127.0.0.1:{35100 + slot}"


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    w = Workers(tmp_path)
    yield w
    w.stop_all()


def make_pools(workers: Workers, said: list[str], prefill: int = 1, decode: int = 1) -> Pools:
    pools = Pools(workers.build, said.append, address, router_drain_timeout_s=60)
    slot = 0
    for role, n in ((Role.PREFILL, prefill), (Role.DECODE, decode)):
        for i in range(n):
            c = workers.build(role, f"{role.value}-{i}", slot)
            c.start()
            workers.ready.add(c.name)
            pools.adopt(c, role, slot)
            slot += 1
    pools.reconcile()
    return pools


def states(pools: Pools, role: Role) -> list[tuple[str, State]]:
    return [(m.component.name, m.state) for m in pools.members if m.role is role]


def wait_for(condition: object, pools: Pools, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        pools.reconcile()
        time.sleep(0.05)


def test_initial_workers_are_members_once_ready(workers: Workers) -> None:
    pools = make_pools(workers, [])
    reply = pools.sync(0, {})
    assert reply["members"]["prefill"] == [address(0)]
    assert reply["members"]["decode"] == [address(1)]
    assert reply["version"] == 2
    assert pools.settled()


def test_a_worker_seen_ready_joins_even_if_a_later_probe_times_out(workers: Workers) -> None:
    """The launcher's first wait marks a worker ready; on busy cores its next probe may
    time out. It must still join the pool (else the router never becomes ready)."""
    pools = Pools(workers.build, [].append, address)
    c = workers.build(Role.DECODE, "decode-0", 0)
    c.start()
    pools.adopt(c, Role.DECODE, 0)
    c.ready = True  # seen ready by the launcher; the probe now answers False
    pools.reconcile()
    assert pools.sync(0, {})["members"]["decode"] == [address(0)]


def test_scale_up_joins_only_when_ready(workers: Workers) -> None:
    said: list[str] = []
    pools = make_pools(workers, said)
    pools.set_target(Role.DECODE, 2)
    pools.reconcile()
    assert states(pools, Role.DECODE) == [("decode-0", State.SERVING), ("decode-1", State.STARTING)]
    # A starting worker is no member: the router cannot send it requests yet.
    assert pools.sync(2, {})["members"]["decode"] == [address(1)]
    assert not pools.settled()
    new = pools.members[-1]
    assert new.slot == 2 and new.component.proc is not None  # a fresh slot, started
    workers.ready.add("decode-1")
    pools.reconcile()
    assert pools.sync(2, {})["members"]["decode"] == [address(1), address(2)]
    assert pools.settled()
    assert any("decode-1 ready" in line for line in said)


def test_scale_down_waits_for_the_router_then_stops_the_worker(workers: Workers) -> None:
    pools = make_pools(workers, [], decode=2)
    before = pools.version
    pools.set_target(Role.DECODE, 1)
    pools.reconcile()
    # The worker with the highest slot leaves the membership at once ...
    assert states(pools, Role.DECODE) == [("decode-0", State.SERVING), ("decode-1", State.LEAVING)]
    assert pools.sync(before, {address(2): 0})["members"]["decode"] == [address(1)]
    leaving = pools.members[-1].component
    # ... but keeps running while the router has not applied that membership ...
    pools.reconcile()
    assert pools.members[-1].state is State.LEAVING and leaving.exit_code() is None
    # ... or still has requests running there.
    pools.sync(pools.version, {address(1): 3, address(2): 1})
    pools.reconcile()
    assert pools.members[-1].state is State.LEAVING and leaving.exit_code() is None
    pools.sync(pools.version, {address(1): 3})
    pools.reconcile()
    assert pools.members[-1].state is State.STOPPING
    wait_for(lambda: len(pools.members) == 2, pools)
    assert leaving.exit_code() is not None
    assert pools.settled()


def test_an_unresponsive_router_does_not_block_a_scale_down_forever(workers: Workers) -> None:
    pools = make_pools(workers, [], decode=2)
    pools.router_drain_timeout_s = 0.2
    pools.set_target(Role.DECODE, 1)
    pools.reconcile()
    time.sleep(0.3)
    wait_for(lambda: len(pools.members) == 2, pools)


def test_scale_down_cancels_starting_workers_first(workers: Workers) -> None:
    pools = make_pools(workers, [])
    pools.set_target(Role.DECODE, 3)
    pools.reconcile()
    version = pools.version
    pools.set_target(Role.DECODE, 1)
    pools.reconcile()
    assert states(pools, Role.DECODE)[0] == ("decode-0", State.SERVING)
    assert {s for _, s in states(pools, Role.DECODE)[1:]} == {State.STOPPING}
    assert pools.version == version  # the membership never changed
    wait_for(lambda: len(pools.members) == 2, pools)


def test_slots_and_names_are_reused_only_when_free(workers: Workers) -> None:
    pools = make_pools(workers, [], decode=2)
    pools.set_target(Role.DECODE, 1)
    pools.reconcile()
    pools.set_target(Role.DECODE, 2)
    pools.reconcile()
    # decode-1 (slot 2) is still leaving: the new worker gets another name and slot.
    new = pools.members[-1]
    assert (new.component.name, new.slot, new.state) == ("decode-2", 3, State.STARTING)


def test_a_worker_that_dies_is_reported_and_not_restarted(workers: Workers) -> None:
    said: list[str] = []
    pools = make_pools(workers, said, decode=2)
    victim = pools.members[-1].component
    victim.signal_group(9)
    assert victim.proc is not None
    victim.proc.wait(timeout=10)
    pools.reconcile()
    assert [name for name, _ in states(pools, Role.DECODE)] == ["decode-0"]
    assert pools.targets[Role.DECODE] == 1
    assert pools.sync(0, {})["members"]["decode"] == [address(1)]
    assert any("decode-1 exited with code -9" in line for line in said)


@pytest.mark.parametrize(
    ("role", "replicas", "message"),
    [
        (Role.DECODE, 0, "at least one decode"),
        (Role.DECODE, -1, ">= 0"),
    ],
)
def test_refused_targets(workers: Workers, role: Role, replicas: int, message: str) -> None:
    pools = make_pools(workers, [], prefill=0)
    with pytest.raises(ConfigError, match=message):
        pools.set_target(role, replicas)


def test_decode_pool_cannot_empty_while_prefill_workers_remain(workers: Workers) -> None:
    pools = make_pools(workers, [])
    pools.set_target(Role.BOTH, 1)
    with pytest.raises(ConfigError, match="prefill workers need decode"):
        pools.set_target(Role.DECODE, 0)


@pytest.fixture
def control(workers: Workers) -> Iterator[tuple[Pools, str]]:
    pools = make_pools(workers, [])
    server = serve_control("127.0.0.1", 0, pools)
    try:
        yield pools, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_control_endpoint_resizes_and_reports(control: tuple[Pools, str], workers: Workers) -> None:
    pools, url = control
    scaler = LauncherScaler(url)
    sizes = scaler.sizes()
    assert (sizes[Role.PREFILL].target, sizes[Role.DECODE].ready) == (1, 1)
    scaler.scale(Role.DECODE, 2)
    pools.reconcile()
    sizes = scaler.sizes()
    assert (sizes[Role.DECODE].target, sizes[Role.DECODE].ready) == (2, 1)
    with pytest.raises(ScalingError, match="did not settle"):
        scaler.wait_settled(timeout_s=0.2, poll_s=0.05)
    workers.ready.add("decode-1")
    pools.reconcile()
    view = scaler.wait_settled(timeout_s=5)
    assert [w["state"] for w in view["pools"]["decode"]["workers"]] == ["serving", "serving"]


def test_control_endpoint_refuses_bad_requests(control: tuple[Pools, str]) -> None:
    _, url = control
    scaler = LauncherScaler(url)
    with pytest.raises(ScalingError, match="at least one decode"):
        scaler.scale(Role.DECODE, 0)
    assert httpx.put(f"{url}/v1/pools/nonsense", json={"replicas": 1}).status_code == 404
    assert httpx.put(f"{url}/v1/pools/decode", json={"replicas": "2"}).status_code == 400
    assert httpx.put(f"{url}/v1/pools/decode", content=b"{").status_code == 400
    assert httpx.post(f"{url}/v1/discovery/sync", json={"applied": "x"}).status_code == 400
    assert httpx.get(f"{url}/v2").status_code == 404
    with pytest.raises(ScalingError, match="cannot reach"):
        LauncherScaler("http://127.0.0.1:9", timeout_s=1).sizes()


async def test_router_follows_the_launcher_and_drains_before_the_stop(
    control: tuple[Pools, str], workers: Workers
) -> None:
    pools, url = control
    router = WorkerPool("m", rpc_timeout_s=1, poll_interval_s=1)
    task = asyncio.create_task(LauncherDiscovery(url, interval_s=0.05).run(router))

    def members() -> set[tuple[Role, str]]:
        return {(w.role, w.address) for w in router.workers}

    async def until(condition: object) -> None:
        deadline = time.monotonic() + 10
        while not condition():  # type: ignore[operator]
            assert time.monotonic() < deadline, "timed out"
            pools.reconcile()
            await asyncio.sleep(0.05)

    try:
        await until(lambda: members() == {(Role.PREFILL, address(0)), (Role.DECODE, address(1))})
        pools.set_target(Role.DECODE, 2)
        workers.ready.add("decode-1")
        await until(lambda: (Role.DECODE, address(2)) in members())
        # A request of the router's own is running on decode-1 when it is scaled away.
        leaving = next(w for w in router.workers if w.address == address(2))
        leaving.in_flight = 1
        pools.set_target(Role.DECODE, 1)
        await until(lambda: (Role.DECODE, address(2)) not in members())
        for _ in range(10):  # the router keeps reporting it; the launcher keeps it running
            pools.reconcile()
            await asyncio.sleep(0.05)
        assert pools.members[-1].state is State.LEAVING
        leaving.in_flight = 0  # the request finished: now it may stop
        await until(lambda: len(pools.members) == 2)
    finally:
        task.cancel()
        await router.close()


async def test_router_keeps_its_members_while_the_launcher_is_unreachable() -> None:
    router = WorkerPool("m", rpc_timeout_s=1, poll_interval_s=1)
    router.add([address(1)], Role.DECODE)
    task = asyncio.create_task(
        LauncherDiscovery("http://127.0.0.1:9", interval_s=0.01, retry_max_s=0.05).run(router)
    )
    await asyncio.sleep(0.3)
    assert [w.address for w in router.workers] == [address(1)]
    assert not task.done()
    task.cancel()
    await router.close()


def test_scale_command_waits_and_fails_when_the_pool_settles_short(
    control: tuple[Pools, str], workers: Workers
) -> None:
    from typer.testing import CliRunner

    from pdserve.cli import app

    pools, url = control
    stop = threading.Event()

    def supervise() -> None:  # the launcher's loop, as `pdserve up` runs it
        while not stop.is_set():
            pools.reconcile()
            time.sleep(0.05)

    loop = threading.Thread(target=supervise, daemon=True)
    loop.start()
    try:
        workers.ready.add("decode-1")
        ok = CliRunner().invoke(app, ["scale", "decode", "2", "--control-url", url])
        assert ok.exit_code == 0, ok.output
        assert "decode 2" in ok.output
        # The next new worker dies while starting: the pool settles at 2, not 3.
        workers.dying.add("decode-2")
        short = CliRunner().invoke(
            app, ["scale", "decode", "3", "--control-url", url, "--timeout-s", "20"]
        )
        assert short.exit_code == 1
        assert "settled at" in short.output and "not 3" in short.output
    finally:
        stop.set()
        loop.join(timeout=5)
