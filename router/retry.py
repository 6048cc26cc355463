"""Failover of one request whose worker failed: retry, colocated fallback, migration.

The decisions live here; ``GenerationService.generate`` runs the attempts. See
docs/adr/0010-failover-retries-migration.md for the design and its limits.

Before the first token reached the client an attempt is repeated (up to
``RetryConfig.budget`` times, after a jittered backoff) on workers that did not fail; when
the budget is spent or no other worker is left, a disaggregated request gets one last
colocated attempt. After the first token, the stream migrates: the prompt plus the tokens
already streamed become a colocated request on another decode worker
(``router/migration.py`` keeps the text exact).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pdserve.config import RetryConfig
from pdserve.errors import NoCapacityError, PdserveError
from pdserve.metrics import RouterMetrics
from pdserve.router.backoff import Backoff
from pdserve.router.migration import Continuation, Progress, TextDecoder
from pdserve.router.planner import Mode, Plan, Planner
from pdserve.router.workers import WorkerClient

if TYPE_CHECKING:  # the service imports this module
    from pdserve.router.service import GenerateCall

log = logging.getLogger(__name__)

# Retry-metric labels: where the repeated attempt went.
TARGET_OTHER = "other_worker"
TARGET_COLOCATED = "colocated"


class WorkerFailure(Exception):
    """A worker failed one attempt. ``unreachable``: the worker itself is gone or hung
    (transport error, deadline, circuit breaker trip), as opposed to a live worker that
    reported an error (for a decode worker, most often a KV pull from a failed prefill)."""

    def __init__(
        self,
        worker: WorkerClient,
        stage: str,
        error: PdserveError,
        *,
        unreachable: bool,
        refused: bool = False,
    ) -> None:
        super().__init__(error.message)
        self.worker = worker
        self.stage = stage
        self.error = error
        self.unreachable = unreachable
        # The worker declined the request (draining, full): others may take it.
        self.refused = refused


@dataclass(frozen=True)
class Attempt:
    plan: Plan
    call: GenerateCall
    continuation: Continuation | None = None
    last_resort: bool = False


@dataclass
class FailoverState:
    """One request's failover bookkeeping."""

    excluded: set[str] = field(default_factory=set)
    live_failures: dict[str, int] = field(default_factory=dict)  # by worker address
    retries: int = 0
    migrations: int = 0
    progress: Progress = field(default_factory=Progress)


class Failover:
    def __init__(
        self,
        config: RetryConfig,
        planner: Planner,
        metrics: RouterMetrics,
        decoder: TextDecoder | None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.planner = planner
        self.metrics = metrics
        self.decoder = decoder
        # Exponential in the retry number, jittered uniformly in [0.5, 1.5).
        self.backoff = Backoff(config.backoff_s, jitter=0.5, rng=rng)

    async def next_attempt(
        self, failed: Attempt, failure: WorkerFailure, state: FailoverState
    ) -> Attempt:
        """The attempt to run after ``failed`` failed, or raise the failure's error."""
        self._exclude(failed.plan, failure, state)
        call = failed.call
        request_id = call.request_id
        if state.progress.token_ids:
            return self._migrate(failed, failure, state)
        if state.retries < self.config.budget:
            state.retries += 1
            await asyncio.sleep(self.backoff.wait_s(state.retries))
            plan = self._plan(call.prompt_token_ids, state, cache_salt=call.cache_salt)
            # Only colocated is left: that is the last resort below.
            if plan is not None and plan.mode is failed.plan.mode:
                self.metrics.retries.labels(failure.stage, TARGET_OTHER).inc()
                log.warning(
                    "request %s: %s failed on %s (%s); retry %d on %s",
                    request_id,
                    failure.stage,
                    failure.worker.name,
                    failure.error.message,
                    state.retries,
                    plan.decode.name,
                )
                retry_call = dataclasses.replace(call, request_id=f"{request_id}-r{state.retries}")
                return Attempt(plan, retry_call)
        if failed.plan.mode is Mode.DISAGGREGATED and not failed.last_resort:
            plan = self._plan(call.prompt_token_ids, state, True, call.cache_salt)
            if plan is None:
                raise failure.error from failure
            self.metrics.retries.labels(failure.stage, TARGET_COLOCATED).inc()
            log.warning(
                "request %s: %s failed on %s (%s); last resort: colocated on %s",
                request_id,
                failure.stage,
                failure.worker.name,
                failure.error.message,
                plan.decode.name,
            )
            fallback = dataclasses.replace(call, request_id=f"{request_id}-colocated")
            return Attempt(plan, fallback, last_resort=True)
        raise failure.error from failure

    def _plan(
        self,
        prompt_token_ids: Sequence[int],
        state: FailoverState,
        colocated: bool = False,
        cache_salt: str | None = None,
    ) -> Plan | None:
        """A plan on workers that have not failed this request; None: none is left."""
        try:
            return self.planner.plan(
                prompt_token_ids,
                exclude=state.excluded,
                colocated=colocated,
                cache_salt=cache_salt,
            )
        except NoCapacityError:
            return None

    def _exclude(self, plan: Plan, failure: WorkerFailure, state: FailoverState) -> None:
        address = failure.worker.address
        state.live_failures[address] = state.live_failures.get(address, 0) + 1
        if (
            not (failure.unreachable or failure.refused)
            and not state.progress.token_ids  # mid-stream, the KV was already pulled
            and failure.stage == "decode"
            and plan.prefill is not None
            and state.live_failures[address] == 1
        ):
            # A live decode worker failed a disaggregated attempt: the KV source (the
            # prefill worker) is the likelier culprit, keep the decode worker once.
            state.excluded.add(plan.prefill.address)
        else:
            state.excluded.add(address)

    def _migrate(self, failed: Attempt, failure: WorkerFailure, state: FailoverState) -> Attempt:
        call = failed.call
        original = failed.continuation.original if failed.continuation else call
        if state.migrations >= self.config.max_migrations:
            self.metrics.migrations.labels("refused").inc()
            raise failure.error from failure
        plan = self._plan(original.prompt_token_ids, state, True, original.cache_salt)
        if plan is None:
            self.metrics.migrations.labels("no_worker").inc()
            raise failure.error from failure
        state.migrations += 1
        continuation = Continuation(original, state.progress, self.decoder)
        request_id = f"{original.request_id}-m{state.migrations}"
        self.metrics.migrations.labels("started").inc()
        log.warning(
            "request %s: decode worker %s failed after %d tokens (%s); migrating to %s",
            original.request_id,
            failure.worker.name,
            len(state.progress.token_ids),
            failure.error.message,
            plan.decode.name,
        )
        return Attempt(plan, continuation.call(request_id), continuation)
