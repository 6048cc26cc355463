"""router/backoff.py: the one exponential backoff of the router's retry loops."""

from __future__ import annotations

import random

import pytest

from pdserve.router.backoff import Backoff


def test_delays_double_up_to_the_cap() -> None:
    backoff = Backoff(0.5, max_s=3.0)
    assert [backoff.delay_s(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_a_source_failing_for_days_never_overflows() -> None:
    assert Backoff(1.0).delay_s(100_000) == 2.0**64
    assert Backoff(1.0, max_s=30.0).delay_s(100_000) == 30.0


@pytest.mark.parametrize("jitter", [0.0, 0.2, 0.5])
def test_jitter_stays_in_its_band(jitter: float) -> None:
    backoff = Backoff(1.0, jitter=jitter, rng=random.Random(7))
    waits = [backoff.wait_s(3) for _ in range(2000)]
    assert all(4 * (1 - jitter) <= w <= 4 * (1 + jitter) for w in waits)
    if jitter:  # spread over the band, not stuck at one value
        assert max(waits) - min(waits) > 4 * jitter
    else:
        assert set(waits) == {4.0}


def test_the_same_seed_gives_the_same_waits() -> None:
    first = Backoff(0.05, jitter=0.5, rng=random.Random(3))
    second = Backoff(0.05, jitter=0.5, rng=random.Random(3))
    assert [first.wait_s(n) for n in (1, 2, 3)] == [second.wait_s(n) for n in (1, 2, 3)]


def test_failed_counts_consecutive_failures_and_reset_starts_over() -> None:
    backoff = Backoff(1.0, max_s=10.0, jitter=0.0)
    assert [backoff.failed() for _ in range(5)] == [1.0, 2.0, 4.0, 8.0, 10.0]
    assert backoff.failures == 5
    backoff.reset()
    assert backoff.failed() == 1.0


@pytest.mark.parametrize(
    ("initial", "cap", "jitter"), [(-1.0, 1.0, 0.2), (1.0, -1.0, 0.2), (1.0, 2.0, 1.5)]
)
def test_bad_settings_are_refused(initial: float, cap: float, jitter: float) -> None:
    with pytest.raises(ValueError):
        Backoff(initial, max_s=cap, jitter=jitter)
