"""OpenTelemetry tracing: the one place that sets it up for every pdserve process.

Off by default. It turns on when an exporter is configured with the usual variables
(``OTEL_TRACES_EXPORTER=otlp|console``, ``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``; ``OTEL_SDK_DISABLED=true`` wins) or by a flag.
When off, ``Tracing.disabled()`` hands out ``NO_TRACE``, whose methods return shared
no-op objects: no SDK objects, no clocks read, no allocation per request.

Spans are started with an explicit parent context and never attached to the asyncio
context: a streamed response outlives the handler that created its root span, and
explicit parents keep the tree right across tasks. Context crosses processes as a W3C
``traceparent`` in gRPC metadata (router -> workers) and is read from the client's HTTP
headers or gRPC metadata.

No module-level tracer provider is installed: each process builds one ``Tracing`` and
passes it to the objects that need it (vLLM's own OTel hooks stay untouched).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from pdserve.config import TraceExporter, TracingConfig

SERVICE_ROUTER = "pdserve-router"
SERVICE_BY_ROLE = {
    "prefill": "pdserve-prefill",
    "decode": "pdserve-decode",
    "both": "pdserve-worker",
}

# Attribute names pdserve puts on spans (one place; docs/observability.md lists them).
ATTR_REQUEST_ID = "pdserve.request_id"
ATTR_STAGE = "pdserve.stage"
ATTR_WORKER = "pdserve.worker"
ATTR_MODE = "pdserve.mode"
ATTR_PREFILL_WORKER = "pdserve.prefill_worker"
ATTR_DECODE_WORKER = "pdserve.decode_worker"
ATTR_PREFILL_POLICY = "pdserve.prefill_policy"
ATTR_DECODE_POLICY = "pdserve.decode_policy"
ATTR_PLAN_REASON = "pdserve.plan_reason"
ATTR_DECODE_CACHED_TOKENS = "pdserve.decode_cached_tokens"
ATTR_PROMPT_TOKENS = "pdserve.prompt_tokens"
ATTR_COMPLETION_TOKENS = "pdserve.completion_tokens"
ATTR_CACHED_TOKENS = "pdserve.cached_prompt_tokens"
ATTR_FINISH_REASON = "pdserve.finish_reason"
ATTR_STREAM = "pdserve.stream"
ATTR_KV_TRANSPORT = "pdserve.kv.transport"
ATTR_KV_BYTES = "pdserve.kv.bytes"
ATTR_KV_BLOCKS = "pdserve.kv.blocks"
ATTR_KV_ENGINE = "pdserve.kv.producer_engine"
ATTR_TIMING_SOURCE = "pdserve.timing_source"
ATTR_CANCELLED = "pdserve.cancelled"
EVENT_FIRST_TOKEN = "first_token"
EVENT_FALLBACK = "fallback_colocated"

_PROPAGATOR = TraceContextTextMapPropagator()


class _NoSpanContext(contextlib.AbstractContextManager[Span]):
    """A reusable context manager yielding the invalid (no-op) span."""

    def __enter__(self) -> Span:
        return trace.INVALID_SPAN

    def __exit__(self, *exc: object) -> None:
        return None


_NO_SPAN = _NoSpanContext()


class RequestTrace:
    """The trace of one request inside one process: a root span and helpers for children.

    ``NO_TRACE`` is the disabled instance; every method is then a no-op.
    """

    def __init__(self, tracer: trace.Tracer | None, root: Span) -> None:
        self._tracer = tracer
        self.root = root
        self._ctx = trace.set_span_in_context(root) if tracer is not None else None

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    @property
    def trace_id(self) -> str:
        """32 hex digits, or '' when tracing is off."""
        if self._tracer is None:
            return ""
        return format(self.root.get_span_context().trace_id, "032x")

    def span(
        self,
        name: str,
        attributes: Mapping[str, Any] | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
    ) -> contextlib.AbstractContextManager[Span]:
        """A child of the root span; an exception marks it failed and propagates."""
        if self._tracer is None:
            return _NO_SPAN
        return _ChildSpan(self.start_child(name, attributes, kind))

    def start_child(
        self,
        name: str,
        attributes: Mapping[str, Any] | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
    ) -> Span:
        """A child of the root span that the caller ends (the invalid span when off)."""
        if self._tracer is None:
            return trace.INVALID_SPAN
        return self._tracer.start_span(name, context=self._ctx, kind=kind, attributes=attributes)

    def record(
        self,
        name: str,
        start_ns: int,
        end_ns: int,
        attributes: Mapping[str, Any] | None = None,
        parent: Span | None = None,
    ) -> None:
        """A finished span measured elsewhere (e.g. vLLM's request timings)."""
        if self._tracer is None:
            return
        ctx = trace.set_span_in_context(parent) if parent is not None else self._ctx
        span = self._tracer.start_span(
            name, context=ctx, start_time=start_ns, attributes=attributes
        )
        span.end(end_time=max(end_ns, start_ns))

    def set(self, key: str, value: Any) -> None:
        if self._tracer is not None:
            self.root.set_attribute(key, value)

    def fail(self, error: BaseException) -> None:
        if self._tracer is not None:
            self.root.record_exception(error)
            self.root.set_status(Status(StatusCode.ERROR, str(error)))

    def end(self) -> None:
        if self._tracer is not None:
            self.root.end()


class _ChildSpan(contextlib.AbstractContextManager[Span]):
    def __init__(self, span: Span) -> None:
        self.span = span

    def __enter__(self) -> Span:
        return self.span

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if isinstance(exc, BaseException) and not isinstance(exc, GeneratorExit):
            self.span.record_exception(exc)
            self.span.set_status(Status(StatusCode.ERROR, str(exc)))
        self.span.end()


NO_TRACE = RequestTrace(None, trace.INVALID_SPAN)


def grpc_metadata(span: Span) -> tuple[tuple[str, str], ...] | None:
    """``traceparent`` (and ``tracestate``) of ``span`` as gRPC metadata; None when off."""
    if not span.get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return tuple(carrier.items())


def extract(carrier: Mapping[str, str] | Iterable[tuple[str, str | bytes]]) -> Context:
    """The remote parent in HTTP headers or gRPC metadata (empty context if none)."""
    if not isinstance(carrier, Mapping):
        carrier = {k: v for k, v in carrier if isinstance(v, str)}
    return _PROPAGATOR.extract(carrier)


def monotonic_offset_ns() -> int:
    """Unix nanoseconds minus ``time.monotonic_ns()`` now: add it to a monotonic stamp
    taken on this host (any process: Linux's CLOCK_MONOTONIC is system-wide) to get the
    wall time spans want. Take it once per batch of stamps so their differences stay exact."""
    return time.time_ns() - time.monotonic_ns()


def wall_ns_from_monotonic(monotonic_s: float, offset_ns: int | None = None) -> int:
    if offset_ns is None:
        offset_ns = monotonic_offset_ns()
    return int(monotonic_s * 1e9) + offset_ns


class Tracing:
    """The tracer of one process, or nothing when tracing is off."""

    def __init__(self, provider: TracerProvider | None) -> None:
        self.provider = provider
        self._tracer = provider.get_tracer("pdserve") if provider is not None else None

    @classmethod
    def disabled(cls) -> Tracing:
        return cls(None)

    @classmethod
    def create(
        cls,
        config: TracingConfig,
        service_name: str,
        processors: Iterable[SpanProcessor] = (),
        exporter: SpanExporter | None = None,
    ) -> Tracing:
        """Export per ``config`` (or to ``exporter``, e.g. an in-memory one in tests) and
        feed ``processors`` (e.g. the router's timeline ring). Disabled when there is
        nothing to feed."""
        processors = list(processors)
        exporter = exporter or _exporter(config)
        if exporter is None and not processors:
            return cls.disabled()
        provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        if exporter is not None:
            provider.add_span_processor(BatchSpanProcessor(exporter))
        for processor in processors:
            provider.add_span_processor(processor)
        return cls(provider)

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def start_request(
        self,
        name: str,
        carrier: Mapping[str, str] | Iterable[tuple[str, str | bytes]] = (),
        attributes: Mapping[str, Any] | None = None,
        kind: SpanKind = SpanKind.SERVER,
    ) -> RequestTrace:
        """The root span of a request in this process; a ``traceparent`` in ``carrier``
        (client headers, or the router's gRPC metadata) becomes its parent."""
        if self._tracer is None:
            return NO_TRACE
        span = self._tracer.start_span(
            name, context=extract(carrier), kind=kind, attributes=attributes
        )
        return RequestTrace(self._tracer, span)

    def shutdown(self) -> None:
        """Flush what is queued for export (called when the process stops)."""
        if self.provider is not None:
            self.provider.shutdown()


def _exporter(config: TracingConfig) -> SpanExporter | None:
    if config.exporter is TraceExporter.CONSOLE:
        return ConsoleSpanExporter()
    if config.exporter is not TraceExporter.OTLP:
        return None
    # Imported only when used; both read the remaining OTEL_EXPORTER_OTLP_* variables.
    if config.otlp_protocol.startswith("http"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        return HttpExporter(endpoint=config.otlp_endpoint)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=config.otlp_endpoint)
