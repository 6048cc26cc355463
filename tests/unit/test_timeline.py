"""The router's timeline ring, its text rendering, worker stage timings, logs and ids."""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass

import pytest

from pdserve.config import TracingConfig
from pdserve.logs import log_handler, request_id_from, set_request_context
from pdserve.router.timeline import Timeline, TimelineRing, format_timeline
from pdserve.tracing import ATTR_KV_BYTES, ATTR_REQUEST_ID, Tracing
from pdserve.v1 import worker_pb2 as pb
from pdserve.worker.timings import (
    KvTransferInfo,
    parse_timings,
    record_stage_spans,
    stage_intervals,
    timings_metadata,
)


def _request(tracing: Tracing, request_id: str) -> None:
    trace = tracing.start_request("POST /v1/completions", attributes={ATTR_REQUEST_ID: request_id})
    with trace.span("tokenize"):
        pass
    with trace.span("decode") as span:
        span.add_event("first_token")
    trace.end()


def test_ring_keeps_the_last_completed_requests() -> None:
    ring = TimelineRing(capacity=2)
    tracing = Tracing.create(TracingConfig(), "pdserve-router", [ring])
    for rid in ("a", "b", "c"):
        _request(tracing, rid)
    assert ring.recent() == ["c", "b"]
    assert ring.get("a") is None
    timeline = ring.get("c")
    assert timeline is not None
    names = [s.name for s in timeline.spans]
    assert names == ["POST /v1/completions", "tokenize", "decode"]
    root = timeline.spans[0]
    assert root.parent_id == "" and all(s.parent_id == root.span_id for s in timeline.spans[1:])
    assert timeline.spans[2].events[0][0] == "first_token"
    # A request still running is not in the ring yet.
    open_trace = tracing.start_request("POST /v1/completions", attributes={ATTR_REQUEST_ID: "d"})
    with open_trace.span("tokenize"):
        pass
    assert ring.get("d") is None
    open_trace.end()
    assert ring.get("d") is not None


def test_timeline_json_round_trip_and_text() -> None:
    ring = TimelineRing()
    _request(Tracing.create(TracingConfig(), "pdserve-router", [ring]), "req-42")
    timeline = ring.get("req-42")
    assert timeline is not None
    again = Timeline.from_json(json.loads(json.dumps(timeline.to_json())))
    assert again == timeline
    text = format_timeline(again)
    lines = text.splitlines()
    assert lines[0].startswith("request req-42  trace " + timeline.trace_id)
    assert "  POST /v1/completions" in lines[2]
    assert "    tokenize" in lines[3]  # indented under the root
    assert any("* first_token" in line for line in lines)


@dataclass
class RequestStateStats:
    """The fields of vLLM's RequestStateStats the worker reads (importing vLLM takes
    tens of seconds; the e2e test reads the real one)."""

    queued_ts: float
    scheduled_ts: float
    first_token_ts: float
    last_token_ts: float


def _stats(queued: float, scheduled: float, first: float, last: float) -> RequestStateStats:
    return RequestStateStats(queued, scheduled, first, last)


def test_stage_intervals_from_vllm_request_stats() -> None:
    stats = _stats(10.0, 10.5, 11.0, 12.0)
    assert stage_intervals(pb.STAGE_PREFILL, stats) == [
        ("queue", 10.0, 10.5),
        ("prefill_compute", 10.5, 11.0),
    ]
    assert [n for n, _, _ in stage_intervals(pb.STAGE_DECODE, stats)] == [
        "kv_transfer",
        "first_token",
        "decode_compute",
    ]
    # Not scheduled yet (cancelled while queued): only what vLLM measured.
    assert stage_intervals(pb.STAGE_FULL, _stats(10.0, 0.0, 0.0, 0.0)) == []


def test_kv_transfer_span_carries_the_bytes() -> None:
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    tracing = Tracing.create(TracingConfig(), "pdserve-decode", [SimpleSpanProcessor(exporter)])
    trace = tracing.start_request("worker.decode")
    kv = KvTransferInfo("nixl", "prefill-0", blocks=3, bytes=3 * 16384)
    record_stage_spans(trace, pb.STAGE_DECODE, _stats(1.0, 1.25, 1.5, 2.0), kv)
    trace.end()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    transfer = spans["kv_transfer"]
    assert transfer.attributes is not None and transfer.attributes[ATTR_KV_BYTES] == 3 * 16384
    assert transfer.end_time is not None and transfer.start_time is not None
    assert abs((transfer.end_time - transfer.start_time) - 250_000_000) < 1_000
    assert spans["decode_compute"].parent.span_id == spans["worker.decode"].context.span_id


def test_worker_timings_metadata_round_trip_and_distrust() -> None:
    key, value = timings_metadata(
        pb.STAGE_DECODE, _stats(1.0, 1.25, 1.5, 2.0), KvTransferInfo("nixl", "p", 2, 100)
    )
    parsed = parse_timings({key: value})
    assert parsed == {
        "kv_transfer_ms": 250.0,
        "first_token_ms": 250.0,
        "decode_compute_ms": 500.0,
        "kv_bytes": 100.0,
        "kv_blocks": 2.0,
    }
    assert parse_timings({key: "not json"}) == {}
    assert parse_timings({key: '{"a": "x", "b": true, "c": 1}'}) == {"c": 1.0}


@pytest.mark.parametrize(
    ("given", "kept"),
    [("req-1", True), ("a" * 128, True), ("a" * 129, False), ("bad id", False), ("", False)],
)
def test_client_request_ids_are_honoured_only_when_sane(given: str, kept: bool) -> None:
    rid = request_id_from(given)
    assert (rid == given) is kept
    assert len(rid) <= 128 and rid


def test_json_logs_carry_request_and_trace_ids() -> None:
    stream = io.StringIO()
    handler = log_handler("json", stream)
    log = logging.getLogger("pdserve.test")
    log.addHandler(handler)
    try:
        set_request_context("req-7", "ab" * 16)
        log.warning("worker %s failed", "decode-0")
    finally:
        log.removeHandler(handler)
        set_request_context("", "")
    line = json.loads(stream.getvalue().splitlines()[-1])
    assert line["message"] == "worker decode-0 failed"
    assert line["request_id"] == "req-7" and line["trace_id"] == "ab" * 16
    assert line["level"] == "WARNING" and line["logger"] == "pdserve.test"
