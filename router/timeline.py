"""The router's bounded ring of completed request timelines (``pdserve inspect``).

A span processor on the router's tracer: it collects the spans of each trace as they end
and, when a request's root span ends, keeps the whole timeline under its request id.
Worker spans live in other processes (and in the OTLP backend); the router's
``prefill``/``decode`` client spans carry the worker-side durations the workers return in
trailing metadata (``pdserve.worker.*_ms`` attributes), so the ring shows them too.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor

from pdserve.tracing import ATTR_REQUEST_ID

DEFAULT_TIMELINE_RING = 256


@dataclass(frozen=True)
class TimelineSpan:
    name: str
    span_id: str
    parent_id: str  # '' for the root (or a remote parent)
    start_ns: int
    end_ns: int
    status: str
    attributes: dict[str, Any] = field(default_factory=dict)
    events: list[tuple[str, int]] = field(default_factory=list)

    @classmethod
    def from_span(cls, span: ReadableSpan) -> TimelineSpan:
        ctx = span.context
        parent = span.parent
        return cls(
            name=span.name,
            span_id=format(ctx.span_id, "016x") if ctx else "",
            parent_id=format(parent.span_id, "016x") if parent and not parent.is_remote else "",
            start_ns=span.start_time or 0,
            end_ns=span.end_time or 0,
            status=span.status.status_code.name,
            attributes={k: _plain(v) for k, v in (span.attributes or {}).items()},
            events=[(e.name, e.timestamp) for e in span.events],
        )


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True)
class Timeline:
    request_id: str
    trace_id: str
    spans: list[TimelineSpan]

    def to_json(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "trace_id": self.trace_id,
            "spans": [{**s.__dict__, "events": [list(e) for e in s.events]} for s in self.spans],
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Timeline:
        spans = [
            TimelineSpan(**{**s, "events": [tuple(e) for e in s.get("events", [])]})
            for s in obj["spans"]
        ]
        return cls(obj["request_id"], obj["trace_id"], spans)


class TimelineRing(SpanProcessor):
    """The last ``capacity`` completed requests' timelines, by request id."""

    def __init__(self, capacity: int = DEFAULT_TIMELINE_RING) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._done: OrderedDict[str, Timeline] = OrderedDict()
        # Spans of traces whose root has not ended yet; bounded against leaks.
        self._pending: OrderedDict[int, list[TimelineSpan]] = OrderedDict()

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if span.context is None:
            return
        record = TimelineSpan.from_span(span)
        trace_id = span.context.trace_id
        request_id = (span.attributes or {}).get(ATTR_REQUEST_ID)
        is_root = record.parent_id == ""
        with self._lock:
            spans = self._pending.setdefault(trace_id, [])
            spans.append(record)
            if is_root and isinstance(request_id, str):
                del self._pending[trace_id]
                spans.sort(key=lambda s: (s.start_ns, -s.end_ns))
                self._done[request_id] = Timeline(request_id, format(trace_id, "032x"), spans)
                self._done.move_to_end(request_id)
                while len(self._done) > self.capacity:
                    self._done.popitem(last=False)
            while len(self._pending) > 4 * self.capacity:
                self._pending.popitem(last=False)

    def get(self, request_id: str) -> Timeline | None:
        with self._lock:
            return self._done.get(request_id)

    def recent(self) -> list[str]:
        """Request ids, newest first."""
        with self._lock:
            return list(reversed(self._done))

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def format_timeline(timeline: Timeline, width: int = 40) -> str:
    """A text Gantt chart: offset and duration of each span, indented by depth."""
    if not timeline.spans:
        return f"request {timeline.request_id}: no spans"
    t0 = min(s.start_ns for s in timeline.spans)
    t1 = max(s.end_ns for s in timeline.spans)
    total = max(t1 - t0, 1)
    depth: dict[str, int] = {}
    by_id = {s.span_id: s for s in timeline.spans}

    def depth_of(s: TimelineSpan) -> int:
        if s.span_id not in depth:
            parent = by_id.get(s.parent_id)
            depth[s.span_id] = 0 if parent is None else depth_of(parent) + 1
        return depth[s.span_id]

    lines = [
        f"request {timeline.request_id}  trace {timeline.trace_id}  total {total / 1e6:.1f} ms",
        f"{'start ms':>9} {'dur ms':>9}  {'':{width}}  span",
    ]
    for s in _tree_order(timeline.spans):
        a = int((s.start_ns - t0) / total * width)
        b = max(a + 1, int((s.end_ns - t0) / total * width))
        bar = " " * a + "#" * (b - a) + " " * (width - b)
        attrs = " ".join(
            f"{k.removeprefix('pdserve.')}={v}"
            for k, v in s.attributes.items()
            if k != ATTR_REQUEST_ID
        )
        status = "" if s.status != "ERROR" else " [ERROR]"
        lines.append(
            f"{(s.start_ns - t0) / 1e6:9.1f} {(s.end_ns - s.start_ns) / 1e6:9.1f}  {bar}  "
            f"{'  ' * depth_of(s)}{s.name}{status}  {attrs}".rstrip()
        )
        for name, ts in s.events:
            lines.append(
                f"{(ts - t0) / 1e6:9.1f} {'':9}  {'':{width}}  {'  ' * depth_of(s)}  * {name}"
            )
    return "\n".join(lines)


def _tree_order(spans: list[TimelineSpan]) -> list[TimelineSpan]:
    """Depth-first, children by start time."""
    ids = {s.span_id for s in spans}
    children: dict[str, list[TimelineSpan]] = {}
    for s in spans:
        parent = s.parent_id if s.parent_id in ids else ""
        children.setdefault(parent, []).append(s)
    out: list[TimelineSpan] = []

    def walk(parent: str) -> None:
        for s in sorted(children.get(parent, []), key=lambda s: s.start_ns):
            out.append(s)
            walk(s.span_id)

    walk("")
    return out
