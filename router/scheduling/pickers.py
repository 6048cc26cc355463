"""Pickers: choose one candidate from the scored ones."""

from __future__ import annotations

import abc
import itertools
import math
import random
from collections.abc import Sequence

# Scores closer than this are a tie (float sums of weighted scores).
TIE_EPSILON = 1e-9


class Picker(abc.ABC):
    name: str

    @abc.abstractmethod
    def pick(self, scores: Sequence[float]) -> int:
        """Index of the chosen candidate (``scores`` is never empty)."""


class MaxScorePicker(Picker):
    """The best score; ties broken at random. With ``temperature`` > 0, a softmax draw
    over score / temperature instead (spreads load among near-equal workers)."""

    name = "max_score"

    def __init__(self, temperature: float = 0.0, rng: random.Random | None = None) -> None:
        self.temperature = temperature
        self.rng = rng or random.Random()

    def pick(self, scores: Sequence[float]) -> int:
        best = max(scores)
        if self.temperature > 0:
            weights = [math.exp((s - best) / self.temperature) for s in scores]
            return self.rng.choices(range(len(scores)), weights)[0]
        ties = [i for i, s in enumerate(scores) if best - s <= TIE_EPSILON]
        return ties[0] if len(ties) == 1 else self.rng.choice(ties)


class RoundRobinPicker(Picker):
    name = "round_robin"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def pick(self, scores: Sequence[float]) -> int:
        return next(self._counter) % len(scores)


class RandomPicker(Picker):
    name = "random"

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()

    def pick(self, scores: Sequence[float]) -> int:
        return self.rng.randrange(len(scores))
