"""When requests are sent: fixed concurrency, Poisson at a rate, bursts, rate sweeps.

The unit of arrival is a chain (one request, or one chat session whose turns run in
order). Closed loop (``concurrency``) keeps N chains in flight; open loop (``poisson``,
``burst``) starts chains at precomputed, seeded offsets whatever the server's speed.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, TypeVar

from pdserve.errors import ConfigError

T = TypeVar("T")
R = TypeVar("R")


class ArrivalKind(StrEnum):
    CONCURRENCY = "concurrency"
    POISSON = "poisson"
    BURST = "burst"


@dataclass(frozen=True)
class ArrivalSpec:
    """How chains arrive. ``rate`` is chains per second (``inf``: all at once)."""

    kind: ArrivalKind = ArrivalKind.CONCURRENCY
    concurrency: int = 4
    rate: float = 1.0
    burst_size: int = 8
    burst_interval_s: float = 5.0
    max_concurrency: int | None = None
    think_time_s: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind is ArrivalKind.CONCURRENCY and self.concurrency < 1:
            raise ConfigError("--concurrency must be >= 1")
        if self.kind is ArrivalKind.POISSON and not self.rate > 0:
            raise ConfigError("--rate must be > 0 (use inf for everything at once)")
        if self.kind is ArrivalKind.BURST and (self.burst_size < 1 or self.burst_interval_s < 0):
            raise ConfigError("--burst needs SIZE >= 1 and INTERVAL >= 0")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ConfigError("--max-concurrency must be >= 1")

    @property
    def offered_rate(self) -> float | None:
        """Chains per second this schedule offers, when it is open loop."""
        if self.kind is ArrivalKind.POISSON:
            return self.rate
        if self.kind is ArrivalKind.BURST and self.burst_interval_s > 0:
            return self.burst_size / self.burst_interval_s
        return None

    @property
    def label(self) -> str:
        if self.kind is ArrivalKind.CONCURRENCY:
            return f"concurrency={self.concurrency}"
        if self.kind is ArrivalKind.POISSON:
            return f"rate={self.rate:g}"
        return f"burst={self.burst_size}/{self.burst_interval_s:g}s"

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "label": self.label,
            "concurrency": self.concurrency if self.kind is ArrivalKind.CONCURRENCY else None,
            "rate": None if self.rate == math.inf else self.rate,
            "offered_rate": self.offered_rate if self.offered_rate != math.inf else None,
            "burst_size": self.burst_size if self.kind is ArrivalKind.BURST else None,
            "burst_interval_s": self.burst_interval_s if self.kind is ArrivalKind.BURST else None,
            "max_concurrency": self.max_concurrency,
            "think_time_s": self.think_time_s,
            "seed": self.seed,
        }


def parse_rates(text: str) -> list[float]:
    """``"0.5,1,2"`` -> ``[0.5, 1.0, 2.0]``; ``inf`` allowed; must increase."""
    try:
        rates = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"bad rate list {text!r}: use e.g. 0.5,1,2") from None
    if not rates or any(not r > 0 for r in rates) or rates != sorted(set(rates)):
        raise ConfigError(f"bad rate list {text!r}: positive and increasing, e.g. 0.5,1,2")
    return rates


def parse_burst(text: str) -> tuple[int, float]:
    """``"8:5"`` -> 8 requests every 5 seconds."""
    try:
        size_s, interval_s = text.split(":")
        return int(size_s), float(interval_s)
    except ValueError:
        raise ConfigError(f"bad burst {text!r}: use SIZE:INTERVAL_SECONDS, e.g. 8:5") from None


def sweep(base: ArrivalSpec, rates: Sequence[float]) -> list[ArrivalSpec]:
    """One Poisson phase per rate, sharing everything else (seed included) with ``base``."""
    return [replace(base, kind=ArrivalKind.POISSON, rate=rate) for rate in rates]


def start_offsets(spec: ArrivalSpec, count: int) -> list[float]:
    """Seconds from the phase start at which each of ``count`` open-loop chains starts."""
    if spec.kind is ArrivalKind.BURST:
        return [(i // spec.burst_size) * spec.burst_interval_s for i in range(count)]
    if spec.kind is ArrivalKind.POISSON:
        if spec.rate == math.inf:
            return [0.0] * count
        rng = random.Random(spec.seed)
        offsets, now = [], 0.0
        for _ in range(count):
            offsets.append(now)
            now += rng.expovariate(spec.rate)
        return offsets
    raise ValueError("closed-loop (concurrency) arrivals have no start offsets")


async def run_arrivals(
    chains: Sequence[Sequence[T]],
    spec: ArrivalSpec,
    send: Callable[[T], Awaitable[R]],
) -> list[R]:
    """Send every request of every chain per ``spec``; results in workload order.

    ``send`` must not raise for a failed request (it returns a failed result instead);
    an exception from it is a bug and propagates after the other tasks are cancelled.
    """
    per_chain: list[list[R]] = [[] for _ in chains]

    async def run_chain(index: int) -> None:
        for turn, item in enumerate(chains[index]):
            if turn and spec.think_time_s > 0:
                await asyncio.sleep(spec.think_time_s)
            per_chain[index].append(await send(item))

    if spec.kind is ArrivalKind.CONCURRENCY:
        pending = list(range(len(chains)))
        pending.reverse()

        async def worker() -> None:
            while pending:
                await run_chain(pending.pop())

        workers = min(spec.concurrency, len(chains))
        await _gather_all([worker() for _ in range(workers)])
    else:
        limit = asyncio.Semaphore(spec.max_concurrency or max(1, len(chains)))
        loop = asyncio.get_running_loop()
        t0 = loop.time()

        async def launch(index: int, offset: float) -> None:
            await asyncio.sleep(max(0.0, t0 + offset - loop.time()))
            async with limit:
                await run_chain(index)

        offsets = start_offsets(spec, len(chains))
        await _gather_all([launch(i, off) for i, off in enumerate(offsets)])
    return [r for results in per_chain for r in results]


async def _gather_all(coros: Sequence[Coroutine[Any, Any, None]]) -> None:
    async with asyncio.TaskGroup() as group:
        for coro in coros:
            group.create_task(coro)
