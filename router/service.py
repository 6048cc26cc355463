"""The serving pipeline behind both client APIs: validate -> plan -> prefill -> decode.

HTTP and gRPC front ends translate their requests into a ``GenerateCall`` and stream the
``Delta`` values this service yields; P/D is a plan, not a second code path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

import grpc

from pdserve.config import AdmissionConfig, RetryConfig
from pdserve.errors import (
    WORKER_VERDICT_KEY,
    ContextLengthError,
    InvalidRequestError,
    KvTransferError,
    ModelNotFoundError,
    NoCapacityError,
    PdserveError,
    WorkerError,
    from_grpc_error,
)
from pdserve.metrics import RouterMetrics
from pdserve.router.admission import Admission
from pdserve.router.first_transfer import FirstTransferGate
from pdserve.router.limits import check_sampling
from pdserve.router.migration import TextDecoder
from pdserve.router.planner import Mode, Plan, Planner
from pdserve.router.request_trace import WorkerCallSpan, plan_attributes
from pdserve.router.retry import Attempt, Failover, FailoverState, WorkerFailure
from pdserve.router.tenancy import CacheSalter
from pdserve.router.workers import WorkerClient, WorkerPool
from pdserve.sampling import FINISH_REASON_NAMES
from pdserve.tracing import EVENT_FALLBACK, NO_TRACE, RequestTrace, wall_ns_from_monotonic
from pdserve.v1 import common_pb2 as cpb
from pdserve.v1 import worker_pb2 as pb

log = logging.getLogger(__name__)

# Routing-decision label for requests that fell back from disaggregated to colocated.
FALLBACK_COLOCATED = "fallback_colocated"


@dataclass(frozen=True)
class GenerateCall:
    request_id: str
    prompt_token_ids: list[int]
    sampling: cpb.SamplingParams
    arrival: float  # time.monotonic() when the request arrived
    trace: RequestTrace = NO_TRACE  # the request's root span in this router
    session_key: str | None = None  # session affinity: a header or the OpenAI user field
    cache_salt: str | None = None  # the tenant's prefix-cache salt (router/tenancy.py)


@dataclass
class Delta:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    usage: cpb.Usage | None = None
    # The first delta of each plan: the routing decision (x-pdserve-route header).
    route: str | None = None


class GenerationService:
    def __init__(
        self,
        model_id: str,
        pool: WorkerPool,
        planner: Planner,
        metrics: RouterMetrics,
        default_max_model_len: int,
        retry: RetryConfig | None = None,
        admission: AdmissionConfig | None = None,
        decoder: TextDecoder | None = None,
        tenancy: CacheSalter | None = None,
    ) -> None:
        self.model_id = model_id
        # Per-tenant prefix-cache salts; off unless configured.
        self.tenancy = tenancy or CacheSalter(enabled=False, by_api_key=False)
        self.pool = pool
        self.planner = planner
        self.metrics = metrics
        self.default_max_model_len = default_max_model_len
        self.first_transfers = FirstTransferGate()
        # decoder: the router's tokenizer, for exact text after a migration.
        self.failover = Failover(retry or RetryConfig(), planner, metrics, decoder)
        self.admission = Admission(admission or AdmissionConfig(), metrics)

    @property
    def max_model_len(self) -> int:
        return self.pool.max_model_len or self.default_max_model_len

    def check_model(self, model: str) -> None:
        if model != self.model_id:
            raise ModelNotFoundError(
                f"the model {model!r} does not exist; this server serves {self.model_id!r}",
                param="model",
            )

    def resolve_max_tokens(self, prompt_len: int, max_tokens: int | None) -> int:
        """Validate lengths before any worker is touched; default max_tokens fills the context."""
        if prompt_len == 0:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        room = self.max_model_len - prompt_len
        if room <= 0:
            raise ContextLengthError(
                f"the prompt has {prompt_len} tokens; this model's context is "
                f"{self.max_model_len} tokens and at least one must be left to generate",
                param="prompt",
            )
        if max_tokens is None:
            return room
        if max_tokens < 1:
            raise InvalidRequestError("max_tokens must be at least 1", param="max_tokens")
        if max_tokens > room:
            raise ContextLengthError(
                f"max_tokens={max_tokens} plus the prompt's {prompt_len} tokens exceeds the "
                f"model's context of {self.max_model_len} tokens; ask for at most {room}",
                param="max_tokens",
            )
        return max_tokens

    async def generate(self, call: GenerateCall) -> AsyncGenerator[Delta, None]:
        """Admit, plan, run; on a worker failure retry, fall back or migrate (retry.py)."""
        check_sampling(call.sampling)
        async with self.admission.admitted():
            self.metrics.queue_time.observe(time.monotonic() - call.arrival)
            if call.trace.enabled:
                call.trace.record("admission", wall_ns_from_monotonic(call.arrival), time.time_ns())
            async for delta in self._generate(call):
                yield delta

    async def _generate(self, call: GenerateCall) -> AsyncIterator[Delta]:
        with call.trace.span("schedule") as span:
            plan = self.planner.plan(
                call.prompt_token_ids, session_key=call.session_key, cache_salt=call.cache_salt
            )
            if span.is_recording():
                span.set_attributes(plan_attributes(plan, self.planner))
        self.metrics.routing.labels(plan.mode.value).inc()
        self.admission.check_worker(plan.decode)
        state = FailoverState()
        attempt = Attempt(plan, call)
        while True:
            try:
                async with contextlib.aclosing(self._attempt(attempt)) as deltas:
                    async for delta in deltas:
                        if attempt.continuation is not None:
                            delta = attempt.continuation.feed(delta)
                        state.progress.add(delta)
                        yield delta
                        if delta.finish_reason is not None:
                            return  # a migrated stream may end here on a stop string
                return
            except WorkerFailure as failure:
                attempt = await self.failover.next_attempt(attempt, failure, state)
                if attempt.last_resort:
                    self.metrics.routing.labels(FALLBACK_COLOCATED).inc()
                    call.trace.root.add_event(EVENT_FALLBACK, {"error": failure.error.message})

    async def _attempt(self, attempt: Attempt) -> AsyncGenerator[Delta, None]:
        """One try on the plan's workers; a worker's failure raises ``WorkerFailure``."""
        plan, call = attempt.plan, attempt.call
        workers = [w for w in (plan.prefill, plan.decode) if w is not None]
        for w in workers:
            w.in_flight += 1
        try:
            if plan.mode is Mode.DISAGGREGATED:
                deltas = self._disaggregated(plan, call)
            else:
                deltas = self._stream(plan, self._worker_request(call, pb.STAGE_FULL), call)
            # Closed on early exit too, so the worker call is cancelled now, not at GC.
            async with contextlib.aclosing(deltas):
                async for delta in deltas:
                    yield delta
        except KvTransferError as e:  # the prefill worker's handle failed the router's checks
            worker = plan.prefill or plan.decode
            raise WorkerFailure(worker, "prefill", e, unreachable=False) from e
        finally:
            for w in workers:
                w.in_flight -= 1

    async def _disaggregated(self, plan: Plan, call: GenerateCall) -> AsyncGenerator[Delta, None]:
        assert plan.prefill is not None
        pair = (plan.prefill.address, plan.decode.address)
        opener = await self.first_transfers.enter(pair)
        try:
            request = self._worker_request(call, pb.STAGE_DECODE)
            request.kv_handle.CopyFrom(await self._prefill(plan.prefill, call))
            decode = self._stream(plan, request, call)
            async with contextlib.aclosing(decode):
                async for delta in decode:
                    if opener:
                        self.first_transfers.done(pair, ok=True)
                        opener = False
                    yield delta
        finally:
            if opener:
                self.first_transfers.done(pair, ok=False)

    @staticmethod
    def _worker_request(call: GenerateCall, stage: pb.Stage) -> pb.WorkerGenerateRequest:
        return pb.WorkerGenerateRequest(
            request_id=call.request_id,
            prompt_token_ids=call.prompt_token_ids,
            sampling=call.sampling,
            stage=stage,
            cache_salt=call.cache_salt or "",
        )

    async def _prefill(self, worker: WorkerClient, call: GenerateCall) -> pb.KvHandle:
        request = self._worker_request(call, pb.STAGE_PREFILL)
        handle: pb.KvHandle | None = None
        async for msg in self._worker_stream(worker, request, call.trace):
            if msg.HasField("kv_handle"):
                handle = msg.kv_handle
        # The router does not trust a worker's reply blindly.
        if handle is None or not handle.transport:
            raise KvTransferError(f"prefill worker {worker.name} returned no KV handle")
        if (
            handle.num_prompt_tokens != len(call.prompt_token_ids)
            or handle.model_id != self.model_id
        ):
            raise KvTransferError(
                f"prefill worker {worker.name} returned a KV handle for another request "
                f"({handle.num_prompt_tokens} tokens of {handle.model_id!r})"
            )
        return handle

    async def _stream(
        self, plan: Plan, request: pb.WorkerGenerateRequest, call: GenerateCall
    ) -> AsyncGenerator[Delta, None]:
        mode = plan.mode.value
        last = None
        route: str | None = plan.route
        stream = self._worker_stream(plan.decode, request, call.trace)
        async with contextlib.aclosing(stream):
            async for msg in stream:
                now = time.monotonic()
                if msg.token_ids:
                    if last is None:
                        self.metrics.ttft.labels(mode).observe(now - call.arrival)
                    else:
                        self.metrics.itl.labels(mode).observe((now - last) / len(msg.token_ids))
                    last = now
                finish = FINISH_REASON_NAMES.get(msg.finish_reason)
                usage = msg.usage if msg.HasField("usage") else None
                if usage is not None:
                    self.metrics.prompt_tokens.inc(usage.prompt_tokens)
                    self.metrics.generation_tokens.inc(usage.completion_tokens)
                if finish is not None:
                    # Before the yield: a consumer that stops at the finish reason closes this
                    # generator there, and nothing after the yield would run.
                    self.metrics.e2e.labels(mode).observe(time.monotonic() - call.arrival)
                yield Delta(msg.text, list(msg.token_ids), finish, usage, route)
                route = None

    async def _worker_stream(
        self, worker: WorkerClient, request: pb.WorkerGenerateRequest, trace: RequestTrace
    ) -> AsyncGenerator[pb.WorkerGenerateResponse, None]:
        """Stream from a worker; errors become typed errors; leaving early cancels the call
        (the worker then aborts the request and frees its KV blocks). The call is a client
        span of ``trace``, propagated to the worker as ``traceparent``."""
        span = WorkerCallSpan.start(trace, worker, request.stage)
        try:
            call = worker.stub.Generate(request, metadata=span.metadata())
        except grpc.aio.UsageError as e:
            # The pool closed the channel after this request was planned: the worker left
            # (scale-in, deregistration). Not its failure; another worker can take it.
            span.fail(e)
            span.end()
            error: PdserveError = NoCapacityError(
                f"worker {worker.name} left the pool; retry the request"
            )
            raise WorkerFailure(
                worker, _stage_name(request), error, unreachable=False, refused=True
            ) from e
        # A hung worker answers nothing: its circuit breaker opening ends the call.
        trip = worker.breaker.watch(call.cancel)
        try:
            async for msg in call:
                await span.on_response(msg, call)
                yield msg
            await span.on_done(call)
        except grpc.aio.AioRpcError as e:
            span.fail(e)
            raise self._failure(worker, request, e) from e
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if trip.fired and (task is None or not task.cancelling()):
                error = WorkerError(f"worker {worker.name} stopped answering (circuit open)")
                raise WorkerFailure(worker, _stage_name(request), error, unreachable=True) from None
            raise
        finally:
            trip.close()
            call.cancel()
            span.end()

    @staticmethod
    def _failure(
        worker: WorkerClient, request: pb.WorkerGenerateRequest, e: grpc.aio.AioRpcError
    ) -> PdserveError | WorkerFailure:
        """The typed error for a failed worker call: a ``WorkerFailure`` (failover may
        help) or the worker's verdict on the request itself (e.g. invalid, incompatible)."""
        if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            log.warning("worker %s failed request %s: %s", worker.name, request.request_id, e)
            error: PdserveError = NoCapacityError(
                f"worker {worker.name} is unavailable ({e.details()}); retry the request"
            )
        else:
            error = from_grpc_error(e.code(), e.details() or "")
        if not isinstance(error, NoCapacityError | WorkerError | KvTransferError):
            return error
        # A live worker that reported an error says so (its verdict in the trailing
        # metadata) and keeps its channel READY; a dead or hung one does neither (or missed
        # the deadline). Only those count against its circuit breaker. Right after a
        # worker dies its channel may still read READY: the verdict decides then.
        state = worker.channel.get_state(try_to_connect=False)
        verdict = any(key == WORKER_VERDICT_KEY for key, _ in e.trailing_metadata() or ())
        unreachable = (
            e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            or state is not grpc.ChannelConnectivity.READY
            or (e.code() == grpc.StatusCode.UNAVAILABLE and not verdict)
        )
        if unreachable:
            worker.breaker.record_failure(f"request failed: {e.code().name}")
        refused = e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        return WorkerFailure(
            worker, _stage_name(request), error, unreachable=unreachable, refused=refused
        )


def _stage_name(request: pb.WorkerGenerateRequest) -> str:
    return pb.Stage.Name(request.stage).removeprefix("STAGE_").lower()
