"""Planning (colocated vs disaggregated) and worker choice, on fake workers."""

from __future__ import annotations

import pytest

from pdserve.config import Role
from pdserve.errors import ConfigError, NoCapacityError
from pdserve.router.planner import Mode, Planner
from pdserve.router.scheduling.policy import LeastLoad, RoundRobin, make_policy
from pdserve.router.workers import WorkerClient, WorkerPool
from pdserve.v1 import worker_pb2 as pb


def fake(address: str, role: Role, healthy: bool = True, in_flight: int = 0) -> WorkerClient:
    w = WorkerClient(address, role, channel=None, stub=None)  # type: ignore[arg-type]
    w.healthy, w.in_flight = healthy, in_flight
    return w


def planner_with(*workers: WorkerClient) -> Planner:
    pool = WorkerPool("m", rpc_timeout_s=1, poll_interval_s=1)
    pool.workers = list(workers)
    return Planner(pool, RoundRobin(), LeastLoad())


def test_disaggregates_when_both_pools_are_healthy() -> None:
    p, d = fake("p", Role.PREFILL), fake("d", Role.DECODE)
    plan = planner_with(p, d).plan([1, 2, 3])
    assert (plan.mode, plan.prefill, plan.decode) == (Mode.DISAGGREGATED, p, d)


def test_colocates_on_decode_when_prefill_pool_is_down() -> None:
    d = fake("d", Role.DECODE)
    plan = planner_with(fake("p", Role.PREFILL, healthy=False), d).plan([1])
    assert (plan.mode, plan.prefill, plan.decode) == (Mode.COLOCATED, None, d)


def test_colocated_workers_serve_alone() -> None:
    b = fake("b", Role.BOTH)
    assert planner_with(b).plan([1]).mode is Mode.COLOCATED


def test_no_capacity_is_a_typed_error() -> None:
    planner = planner_with(fake("p", Role.PREFILL), fake("d", Role.DECODE, healthy=False))
    assert not planner.can_serve()
    with pytest.raises(NoCapacityError):
        planner.plan([1])


def test_round_robin_and_least_load() -> None:
    a, b = fake("a", Role.DECODE), fake("b", Role.DECODE, in_flight=2)
    rr = RoundRobin()
    assert [rr.pick([a, b], []).address for _ in range(4)] == ["a", "b", "a", "b"]
    assert LeastLoad().pick([b, a], []) is a
    b.in_flight, a.load = 0, pb.LoadReport(running_requests=5)
    assert LeastLoad().pick([a, b], []) is b


def test_unknown_policy() -> None:
    with pytest.raises(ConfigError, match="round_robin"):
        make_policy("psychic")
