"""The router's spans over real gRPC to fake workers: tree, propagation, ids, the ring.

The in-process half of the tracing acceptance (the SDK's in-memory exporter); the
cross-process half runs a real cluster (tests/e2e/cluster/test_tracing.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import CollectorRegistry

from pdserve.config import Role, TracingConfig
from pdserve.metrics import RouterMetrics
from pdserve.models import resolve_model
from pdserve.router.api.grpc import InferenceServicer
from pdserve.router.api.http import build_http_app
from pdserve.router.planner import Planner
from pdserve.router.scheduling.policy import make_policy
from pdserve.router.service import GenerationService
from pdserve.router.timeline import Timeline, TimelineRing, format_timeline
from pdserve.router.tokenize import PromptTokenizer
from pdserve.router.workers import WorkerPool
from pdserve.tracing import Tracing
from pdserve.v1 import common_pb2 as cpb
from pdserve.v1 import inference_pb2 as ipb
from pdserve.v1 import inference_pb2_grpc
from pdserve.v1 import worker_pb2 as pb
from tests.unit.fake_worker import FakeWorker, fake_router, serve_fake

MODEL = "fake-model"
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


class RecordingWorker(FakeWorker):
    """A fake worker that keeps the gRPC metadata of each call."""

    def __init__(self, role: int) -> None:
        super().__init__(role, MODEL)
        self.metadata: list[dict[str, str]] = []

    async def Generate(
        self, request: pb.WorkerGenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WorkerGenerateResponse]:
        self.metadata.append({k: v for k, v in context.invocation_metadata() or ()})
        async for msg in super().Generate(request, context):
            yield msg


@dataclass
class Setup:
    http: httpx.AsyncClient
    grpc_stub: inference_pb2_grpc.InferenceStub
    prefill: RecordingWorker
    decode: RecordingWorker
    spans: InMemorySpanExporter
    ring: TimelineRing


@pytest.fixture(scope="module")
def tokenizer() -> PromptTokenizer:
    return PromptTokenizer(str(resolve_model("tiny")))


@pytest.fixture
async def setup(tokenizer: PromptTokenizer) -> AsyncIterator[Setup]:
    prefill, decode = RecordingWorker(pb.ROLE_PREFILL), RecordingWorker(pb.ROLE_DECODE)
    async with fake_router(prefill, decode, MODEL) as router:
        service, planner, metrics = router.service, router.planner, router.metrics
        exporter, ring = InMemorySpanExporter(), TimelineRing()
        tracing = Tracing.create(
            TracingConfig(), "pdserve-router", [SimpleSpanProcessor(exporter), ring]
        )
        app = build_http_app(
            service, tokenizer, metrics.registry, planner.can_serve, 4096, tracing, ring
        )
        server = grpc.aio.server()
        inference_pb2_grpc.add_InferenceServicer_to_server(
            InferenceServicer(service, tokenizer, tracing), server
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
            yield Setup(
                client, inference_pb2_grpc.InferenceStub(channel), prefill, decode, exporter, ring
            )
        await channel.close()
        await server.stop(None)


def _by_name(spans: tuple[ReadableSpan, ...]) -> dict[str, ReadableSpan]:
    names = [s.name for s in spans]
    assert len(names) == len(set(names)), names
    return {s.name: s for s in spans}


def _span_id(span: ReadableSpan) -> str:
    assert span.context is not None
    return format(span.context.span_id, "016x")


def _parent_id(span: ReadableSpan) -> str:
    assert span.parent is not None
    return format(span.parent.span_id, "016x")


@pytest.mark.parametrize("stream", [False, True])
async def test_one_trace_per_request_with_the_expected_tree(setup: Setup, stream: bool) -> None:
    body = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 3, "stream": stream}
    headers = {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01", "x-request-id": "req-9"}
    r = await setup.http.post("/v1/completions", json=body, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == "req-9"
    assert r.headers["x-trace-id"] == CLIENT_TRACE
    spans = _by_name(setup.spans.get_finished_spans())
    assert set(spans) == {
        "POST /v1/completions",
        "tokenize",
        "admission",
        "schedule",
        "prefill",
        "decode",
    }
    assert {format(s.context.trace_id, "032x") for s in spans.values() if s.context} == {
        CLIENT_TRACE
    }
    root = spans["POST /v1/completions"]
    assert root.parent is not None and root.parent.is_remote
    assert _parent_id(root) == CLIENT_SPAN  # the client's span parents the router's root
    assert root.attributes is not None and root.attributes["pdserve.request_id"] == "req-9"
    for name in ("tokenize", "admission", "schedule", "prefill", "decode"):
        child = spans[name]
        assert _parent_id(child) == _span_id(root)
        assert root.start_time is not None and root.end_time is not None
        assert child.start_time is not None and child.end_time is not None
        assert root.start_time <= child.start_time <= child.end_time <= root.end_time
    order = ["tokenize", "admission", "schedule", "prefill", "decode"]
    starts = [spans[n].start_time or 0 for n in order]
    assert starts == sorted(starts)
    schedule = spans["schedule"].attributes or {}
    assert schedule["pdserve.mode"] == "disaggregated"
    assert schedule["pdserve.prefill_worker"] == f"fake-{pb.ROLE_PREFILL}"
    assert schedule["pdserve.decode_worker"] == f"fake-{pb.ROLE_DECODE}"
    decode = spans["decode"]
    assert decode.kind is SpanKind.CLIENT
    assert [e.name for e in decode.events] == ["first_token"]
    assert (decode.attributes or {})["pdserve.completion_tokens"] == 3
    # Each worker call carries the client span it belongs to as its traceparent.
    (prefill_md,) = setup.prefill.metadata
    (decode_md,) = setup.decode.metadata
    assert prefill_md["traceparent"] == f"00-{CLIENT_TRACE}-{_span_id(spans['prefill'])}-01"
    assert decode_md["traceparent"] == f"00-{CLIENT_TRACE}-{_span_id(spans['decode'])}-01"
    # The ring has the same request for `pdserve inspect`.
    r = await setup.http.get("/debug/requests/req-9")
    assert r.status_code == 200
    timeline = Timeline.from_json(r.json())
    assert timeline.spans[0].name == "POST /v1/completions"
    assert len(timeline.spans) == 6 and timeline.trace_id == CLIENT_TRACE
    assert "decode" in format_timeline(timeline)
    assert (await setup.http.get("/debug/requests")).json()["requests"] == ["req-9"]


async def test_insane_request_id_is_replaced_and_errors_end_the_trace(setup: Setup) -> None:
    setup.decode.fail_with = grpc.StatusCode.INTERNAL
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
    r = await setup.http.post("/v1/completions", json=body, headers={"x-request-id": "a b"})
    assert r.status_code >= 500
    spans = setup.spans.get_finished_spans()
    (root,) = [s for s in spans if s.name == "POST /v1/completions"]
    assert root.status.status_code is StatusCode.ERROR
    # Every failed decode call (the fallback's included) is its own failed span.
    failed = [s for s in spans if s.name in ("decode", "generate")]
    assert failed and all(s.status.status_code is StatusCode.ERROR for s in failed)
    assert all(root.start_time <= (s.start_time or 0) <= (s.end_time or 0) <= root.end_time
               for s in spans if s is not root)  # fmt: skip
    request_id = (root.attributes or {})["pdserve.request_id"]
    assert request_id != "a b" and len(str(request_id)) == 32
    assert (await setup.http.get(f"/debug/requests/{request_id}")).status_code == 200
    assert (await setup.http.get("/debug/requests/unknown")).status_code == 404


async def test_grpc_api_traceparent_and_trailing_request_id(setup: Setup) -> None:
    request = ipb.GenerateRequest(
        model=MODEL, prompt="Hello", sampling=cpb.SamplingParams(max_tokens=2)
    )
    call = setup.grpc_stub.Generate(
        request,
        metadata=(
            ("traceparent", f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"),
            ("x-request-id", "grpc-req-1"),
        ),
    )
    texts = [msg.text async for msg in call]
    assert texts
    trailing = dict(await call.trailing_metadata())
    assert trailing["x-request-id"] == "grpc-req-1"
    spans = _by_name(setup.spans.get_finished_spans())
    root = spans["pdserve.v1.Inference/Generate"]
    assert _parent_id(root) == CLIENT_SPAN
    assert {"tokenize", "schedule", "prefill", "decode"} <= set(spans)
    # Errors keep the request id in the trailing metadata too.
    bad = setup.grpc_stub.Generate(ipb.GenerateRequest(model="other", prompt="x"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in bad:
            pass
    assert err.value.code() is grpc.StatusCode.NOT_FOUND
    request_id = dict(err.value.trailing_metadata() or ())["x-request-id"]
    assert len(request_id) == 32


async def test_tracing_off_sends_no_traceparent(tokenizer: PromptTokenizer) -> None:
    decode = RecordingWorker(pb.ROLE_DECODE)
    server, address = await serve_fake(decode)
    pool = WorkerPool(MODEL, rpc_timeout_s=2, poll_interval_s=0.1)
    pool.add([address], Role.DECODE)
    await pool.poll_once()
    metrics = RouterMetrics(CollectorRegistry())
    planner = Planner(pool, make_policy("round_robin"), make_policy("least_load"))
    service = GenerationService(MODEL, pool, planner, metrics, default_max_model_len=64)
    app = build_http_app(service, tokenizer, metrics.registry, planner.can_serve, 4096)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 200
        assert len(r.headers["x-request-id"]) == 32 and "x-trace-id" not in r.headers
        assert (await client.get("/debug/requests")).status_code == 404
    assert "traceparent" not in decode.metadata[0]
    await pool.close()
    await server.stop(None)


async def test_pdserve_inspect_prints_the_timeline(setup: Setup) -> None:
    """`pdserve inspect` against the router's HTTP app served on a real port."""
    import asyncio
    import socket

    import uvicorn
    from typer.testing import CliRunner

    from pdserve.cli import app as cli

    headers = {"x-request-id": "inspect-7"}
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
    assert (await setup.http.post("/v1/completions", json=body, headers=headers)).is_success
    asgi_app = setup.http._transport.app  # type: ignore[attr-defined]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(asgi_app, port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    for _ in range(1000):  # uvicorn sets `started` once it listens
        if server.started:
            break
        await asyncio.sleep(0.01)
    try:
        router = f"http://127.0.0.1:{port}"
        runner = CliRunner()
        found = await asyncio.to_thread(
            runner.invoke, cli, ["inspect", "inspect-7", "--router", router]
        )
        missing = await asyncio.to_thread(
            runner.invoke, cli, ["inspect", "nope", "--router", router]
        )
    finally:
        server.should_exit = True
        await task
    assert found.exit_code == 0, found.output
    lines = found.output.splitlines()
    assert lines[0].startswith("request inspect-7  trace ")
    span_lines = [line for line in lines[2:] if "* " not in line]  # not the event lines
    names = ["POST /v1/completions", "tokenize", "admission", "schedule", "prefill", "decode"]
    for name, line in zip(names, span_lines, strict=True):
        assert name in line, (name, line)
    assert missing.exit_code == 1 and "no timeline" in missing.output
