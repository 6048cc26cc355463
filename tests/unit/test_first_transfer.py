"""The first-transfer gate: one opener per pair, waiters follow, failures pass the turn."""

from __future__ import annotations

import asyncio

from pdserve.router.first_transfer import FirstTransferGate

PAIR = ("p:1", "d:1")


async def test_one_opener_then_everyone_passes() -> None:
    gate = FirstTransferGate()
    assert await gate.enter(PAIR) is True
    waiter = asyncio.create_task(gate.enter(PAIR))
    await asyncio.sleep(0.01)
    assert not waiter.done()  # held while the first transfer is in flight
    gate.done(PAIR, ok=True)
    assert await waiter is False
    assert gate.is_warm(PAIR) and await gate.enter(PAIR) is False
    assert await gate.enter(("p:1", "d:2")) is True  # other pairs are independent


async def test_a_failed_opener_hands_the_turn_to_one_waiter() -> None:
    gate = FirstTransferGate()
    assert await gate.enter(PAIR) is True
    waiters = [asyncio.create_task(gate.enter(PAIR)) for _ in range(3)]
    await asyncio.sleep(0.01)
    gate.done(PAIR, ok=False)
    await asyncio.sleep(0.01)
    finished = [w for w in waiters if w.done()]
    assert [w.result() for w in finished] == [True]  # exactly one new opener
    gate.done(PAIR, ok=True)
    assert sorted(await asyncio.gather(*waiters)) == [False, False, True]
