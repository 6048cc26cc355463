"""pdserve/tracing.py with the SDK's in-memory exporter: config, propagation, span tree."""

from __future__ import annotations

import time

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import INVALID_SPAN, SpanKind, StatusCode

from pdserve.config import TraceExporter, TracingConfig
from pdserve.errors import ConfigError, InvalidRequestError
from pdserve.kv_transfer.metadata import KvLayout
from pdserve.tracing import NO_TRACE, Tracing, grpc_metadata, wall_ns_from_monotonic

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"


def in_memory(service: str) -> tuple[Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    return Tracing.create(TracingConfig(), service, [SimpleSpanProcessor(exporter)]), exporter


@pytest.mark.parametrize(
    ("env", "exporter"),
    [
        ({}, TraceExporter.NONE),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, TraceExporter.OTLP),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4317"}, TraceExporter.OTLP),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, TraceExporter.OTLP),
        ({"OTEL_TRACES_EXPORTER": "console"}, TraceExporter.CONSOLE),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "x"}, TraceExporter.NONE),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, TraceExporter.NONE),
    ],
)
def test_tracing_is_off_unless_an_exporter_is_configured(
    env: dict[str, str], exporter: TraceExporter
) -> None:
    assert TracingConfig.from_env(env).exporter is exporter


def test_flag_endpoint_and_protocol() -> None:
    config = TracingConfig.from_env(
        {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, otlp_endpoint="http://c:4318"
    )
    assert config == TracingConfig(TraceExporter.OTLP, "http://c:4318", "http/protobuf")
    with pytest.raises(ConfigError, match="jaeger"):
        TracingConfig.from_env({"OTEL_TRACES_EXPORTER": "jaeger"})
    with pytest.raises(ConfigError, match="protocol"):
        TracingConfig.from_env({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "x"})


def test_disabled_tracing_hands_out_no_op_objects() -> None:
    tracing = Tracing.create(TracingConfig(), "pdserve-router")
    assert not tracing.enabled
    trace = tracing.start_request("POST /v1/completions", {"traceparent": TRACEPARENT})
    assert trace is NO_TRACE and trace.trace_id == ""
    with trace.span("tokenize") as span:
        assert span is INVALID_SPAN
    assert trace.start_child("prefill") is INVALID_SPAN
    assert grpc_metadata(INVALID_SPAN) is None
    trace.record("queue", 1, 2)
    trace.end()


def test_client_traceparent_parents_the_root_and_children_nest() -> None:
    tracing, exporter = in_memory("pdserve-router")
    trace = tracing.start_request(
        "POST /v1/completions", {"traceparent": TRACEPARENT}, {"pdserve.request_id": "r1"}
    )
    assert trace.trace_id == CLIENT_TRACE
    with trace.span("tokenize"):
        pass
    with pytest.raises(InvalidRequestError), trace.span("schedule"):
        raise InvalidRequestError("no")
    trace.record("queue", 1_000, 2_000, {"pdserve.timing_source": "test"})
    trace.end()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    root = spans["POST /v1/completions"]
    assert root.parent is not None and root.parent.is_remote
    assert format(root.parent.span_id, "016x") == CLIENT_SPAN
    assert root.kind is SpanKind.SERVER
    assert root.resource.attributes["service.name"] == "pdserve-router"
    for name in ("tokenize", "schedule", "queue"):
        assert spans[name].parent is not None
        assert spans[name].parent.span_id == root.context.span_id
        assert spans[name].context.trace_id == root.context.trace_id
    assert spans["schedule"].status.status_code is StatusCode.ERROR
    assert spans["tokenize"].status.status_code is StatusCode.UNSET
    assert (spans["queue"].start_time, spans["queue"].end_time) == (1_000, 2_000)


def test_grpc_metadata_carries_the_context_to_another_process() -> None:
    router, router_spans = in_memory("pdserve-router")
    worker, worker_spans = in_memory("pdserve-decode")
    trace = router.start_request("pdserve.v1.Inference/Generate")
    call = trace.start_child("decode", kind=SpanKind.CLIENT)
    metadata = grpc_metadata(call)
    assert metadata is not None and metadata[0][0] == "traceparent"
    # gRPC hands metadata over as (key, value) pairs, binary values as bytes.
    worker_trace = worker.start_request("worker.decode", [*metadata, ("x-bin", b"\x00")])
    worker_trace.end()
    call.end()
    trace.end()
    (worker_root,) = worker_spans.get_finished_spans()
    assert worker_root.parent is not None
    assert worker_root.parent.span_id == call.get_span_context().span_id
    assert worker_root.context.trace_id == call.get_span_context().trace_id
    assert worker_root.resource.attributes["service.name"] == "pdserve-decode"
    assert len(router_spans.get_finished_spans()) == 2


def test_monotonic_stamps_convert_to_wall_time() -> None:
    before = time.time_ns()
    converted = wall_ns_from_monotonic(time.monotonic())
    after = time.time_ns()
    assert before - 1_000_000 <= converted <= after + 1_000_000
    one_second_ago = wall_ns_from_monotonic(time.monotonic() - 1.0)
    assert abs((time.time_ns() - one_second_ago) - 1_000_000_000) < 50_000_000


def test_kv_block_bytes_follow_the_layout() -> None:
    # The tiny test model: 4 layers, 2 KV heads of 32, float32, 16-token blocks.
    layout = KvLayout("tiny", "float32", 16, 4, 2, 32, 1, 1)
    assert layout.block_bytes() == 2 * 4 * 16 * 2 * 32 * 4
    half = KvLayout("tiny", "bfloat16", 16, 4, 2, 32, 2, 1)
    assert half.block_bytes() == layout.block_bytes() // 2
