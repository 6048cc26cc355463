"""``pdserve bench compare``: the same workload against several setups, one after another."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from types import FrameType

from pdserve.bench.runner import PhaseHook, RunPlan, TargetResult, run_target, served_model
from pdserve.bench.setups import SetupContext, SetupSpec, build_setup, wait_ready
from pdserve.errors import PdserveError

StatusHook = Callable[[str], None]


def run_compare(
    specs: Sequence[SetupSpec],
    ctx: SetupContext,
    plan: RunPlan,
    startup_timeout_s: float = 900.0,
    stop_timeout_s: float = 30.0,
    on_phase: PhaseHook | None = None,
    on_status: StatusHook | None = None,
    targets: list[TargetResult] | None = None,
) -> list[TargetResult]:
    """Start each setup (or attach), run ``plan`` on it, stop it; a failed setup is
    recorded in its result and the next one still runs. Only one setup runs at a time,
    so they get the same cores. Results are appended to ``targets`` as they finish, so
    a caller interrupted half-way still holds what was measured."""
    status = on_status or (lambda _msg: None)
    targets = [] if targets is None else targets
    for index, spec in enumerate(specs):
        try:
            setup = build_setup(spec, ctx, index)
        except PdserveError as e:
            targets.append(
                TargetResult(spec.label, spec.url or "", ctx.served_name, error=e.message)
            )
            status(f"{spec.label}: cannot set up: {e.message}")
            continue
        target = TargetResult(
            spec.label, setup.url, ctx.served_name, setup=setup.describe(), engines=setup.engines
        )
        targets.append(target)
        try:
            status(f"{spec.label}: starting" if setup.stages else f"{spec.label}: attaching")
            started = time.monotonic()
            if setup.stages:
                setup.start(ctx.served_name, startup_timeout_s)
            else:
                target.model = asyncio.run(served_model(setup.url))
                wait_ready(setup.url, target.model, started + startup_timeout_s, probe=True)
            target.setup["startup_s"] = round(time.monotonic() - started, 1)
            status(f"{spec.label}: ready after {target.setup['startup_s']} s, benchmarking")
            asyncio.run(run_target(target, plan, on_phase))
        except PdserveError as e:
            target.error = e.message
            status(f"{spec.label}: failed: {e.message.splitlines()[0]}")
        finally:
            if setup.stages:
                status(f"{spec.label}: stopping")
                setup.stop(stop_timeout_s)
    return targets


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt while benchmarking, so ``finally`` blocks stop
    the setups instead of leaving their process groups behind."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
