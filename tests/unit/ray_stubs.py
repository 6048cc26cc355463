"""Stand-ins for Ray in fast unit tests: an actor handle over a real object whose
``method.remote(...)`` runs the method at once and returns a ready reference, and a
``ray.get`` that resolves those references. The code under test is the real one."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest


class StubRef:
    def __init__(self, value: Any = None, error: BaseException | None = None) -> None:
        self.value = value
        self.error = error

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value

    def __await__(self) -> Generator[Any, None, Any]:
        return self.result()
        yield  # (makes this a generator)


class _Method:
    def __init__(self, actor: StubActor, name: str) -> None:
        self.actor = actor
        self.name = name

    def remote(self, *args: Any, **kwargs: Any) -> StubRef:
        self.actor.calls.append(self.name)
        if self.actor.error is not None:
            return StubRef(error=self.actor.error)
        return StubRef(getattr(self.actor.target, self.name)(*args, **kwargs))


class StubActor:
    """A handle on ``target``; set ``error`` to make every call fail with it."""

    def __init__(self, target: Any) -> None:
        self.target = target
        self.error: BaseException | None = None
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> _Method:
        return _Method(self, name)


def stub_ray_get(monkeypatch: pytest.MonkeyPatch) -> None:
    """``ray.get`` resolves StubRefs (the code under test imports ray inside functions)."""
    import ray

    def get(ref: StubRef, timeout: float | None = None) -> Any:
        return ref.result()

    monkeypatch.setattr(ray, "get", get)
