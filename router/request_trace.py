"""Span attributes the router's request path attaches (kept out of the service's logic)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Status, StatusCode

from pdserve.router.planner import Plan, Planner
from pdserve.router.workers import WorkerClient
from pdserve.sampling import FINISH_REASON_NAMES
from pdserve.tracing import (
    ATTR_CACHED_TOKENS,
    ATTR_COMPLETION_TOKENS,
    ATTR_DECODE_CACHED_TOKENS,
    ATTR_DECODE_POLICY,
    ATTR_DECODE_WORKER,
    ATTR_FINISH_REASON,
    ATTR_MODE,
    ATTR_PLAN_REASON,
    ATTR_PREFILL_POLICY,
    ATTR_PREFILL_WORKER,
    ATTR_PROMPT_TOKENS,
    ATTR_WORKER,
    EVENT_FIRST_TOKEN,
    RequestTrace,
    grpc_metadata,
)
from pdserve.v1 import worker_pb2 as pb
from pdserve.worker.timings import parse_timings

WORKER_TIMING_PREFIX = "pdserve.worker."


def plan_attributes(plan: Plan, planner: Planner) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        ATTR_MODE: plan.mode.value,
        ATTR_DECODE_WORKER: plan.decode.name,
        ATTR_DECODE_POLICY: planner.decode_policy.name,
        ATTR_PLAN_REASON: plan.reason,
        ATTR_DECODE_CACHED_TOKENS: plan.cached_tokens,
    }
    if plan.prefill is not None:
        attrs[ATTR_PREFILL_WORKER] = plan.prefill.name
        attrs[ATTR_PREFILL_POLICY] = planner.prefill_policy.name
    return attrs


def worker_attributes(worker: WorkerClient) -> dict[str, Any]:
    return {ATTR_WORKER: worker.name, "server.address": worker.address}


_SPAN_NAMES: dict[int, str] = {
    pb.STAGE_PREFILL: "prefill",
    pb.STAGE_DECODE: "decode",
    pb.STAGE_FULL: "generate",
}


class WorkerCallSpan:
    """The client span of one router -> worker call: ``prefill``, ``decode`` or
    ``generate`` (colocated). A shared no-op instance when tracing is off.

    The span ends when the worker's final message arrives (with the worker's stage
    timings from the call's trailing metadata), before that message goes on to the
    client: a consumer that stops at the final message still gets a complete span.
    """

    __slots__ = ("_ended", "_first_seen", "span")

    def __init__(self, span: Span) -> None:
        self.span = span
        self._first_seen = False
        self._ended = False

    @classmethod
    def start(cls, trace: RequestTrace, worker: WorkerClient, stage: int) -> WorkerCallSpan:
        if not trace.enabled:
            return _NO_CALL
        name = _SPAN_NAMES.get(stage, "worker")
        return cls(trace.start_child(name, worker_attributes(worker), SpanKind.CLIENT))

    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        return grpc_metadata(self.span) if self.span.is_recording() else None

    async def on_response(self, msg: pb.WorkerGenerateResponse, call: Any) -> None:
        """First-token event; finish reason, usage and worker timings at the end."""
        if not self.span.is_recording():
            return
        if msg.token_ids and not self._first_seen:
            self._first_seen = True
            self.span.add_event(EVENT_FIRST_TOKEN)
        if msg.HasField("usage"):
            self.span.set_attributes(
                {
                    ATTR_PROMPT_TOKENS: msg.usage.prompt_tokens,
                    ATTR_COMPLETION_TOKENS: msg.usage.completion_tokens,
                    ATTR_CACHED_TOKENS: msg.usage.cached_prompt_tokens,
                }
            )
        if msg.finish_reason:
            reason = FINISH_REASON_NAMES.get(msg.finish_reason, "")
            self.span.set_attribute(ATTR_FINISH_REASON, reason)
            await self.on_done(call)

    async def on_done(self, call: Any) -> None:
        """The call is over: the worker's stage timings, then the end of the span."""
        if self.span.is_recording() and not self._ended:
            annotate_worker_timings(self.span, await call.trailing_metadata())
            self.end()

    def fail(self, error: BaseException) -> None:
        if self.span.is_recording():
            self.span.record_exception(error)
            self.span.set_status(Status(StatusCode.ERROR, str(error)))

    def end(self) -> None:
        if not self._ended:
            self._ended = True
            self.span.end()


_NO_CALL = WorkerCallSpan(INVALID_SPAN)


def annotate_worker_timings(span: Span, trailing: Iterable[tuple[str, Any]] | None) -> None:
    """The worker's vLLM-measured stage durations, as ``pdserve.worker.<stage>_ms``."""
    metadata = {k: v for k, v in (trailing or ()) if isinstance(v, str)}
    for key, value in parse_timings(metadata).items():
        span.set_attribute(WORKER_TIMING_PREFIX + key, value)
