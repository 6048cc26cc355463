"""Per request: colocated (one worker does both) or disaggregated (prefill, then decode)."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.config import Role
from pdserve.errors import NoCapacityError
from pdserve.router.scheduling.policy import Policy
from pdserve.router.workers import WorkerClient, WorkerPool


class Mode(enum.StrEnum):
    COLOCATED = "colocated"
    DISAGGREGATED = "disaggregated"


@dataclass(frozen=True)
class Plan:
    mode: Mode
    decode: WorkerClient  # the worker that streams tokens (and prefills when colocated)
    prefill: WorkerClient | None = None


class Planner:
    """Disaggregate whenever a prefill and a decode worker are healthy; otherwise colocate
    on a decode or colocated worker, so losing the prefill pool degrades, not fails."""

    def __init__(self, pool: WorkerPool, prefill_policy: Policy, decode_policy: Policy) -> None:
        self.pool = pool
        self.prefill_policy = prefill_policy
        self.decode_policy = decode_policy

    def plan(self, prompt_token_ids: Sequence[int]) -> Plan:
        prefills = self.pool.healthy(Role.PREFILL)
        decodes = self.pool.healthy(Role.DECODE)
        if prefills and decodes:
            return Plan(
                Mode.DISAGGREGATED,
                decode=self.decode_policy.pick(decodes, prompt_token_ids),
                prefill=self.prefill_policy.pick(prefills, prompt_token_ids),
            )
        colocated = self.pool.healthy(Role.BOTH) or decodes
        if colocated:
            return Plan(Mode.COLOCATED, decode=self.decode_policy.pick(colocated, prompt_token_ids))
        raise NoCapacityError("no healthy worker can serve this request; retry later")

    def can_serve(self) -> bool:
        return bool(self.pool.healthy(Role.BOTH, Role.DECODE))
