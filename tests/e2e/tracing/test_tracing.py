"""One OpenTelemetry trace per request across router, prefill, KV transfer and decode.

The router and both workers export with their real OTLP exporters to a receiver in this
test process (tests/e2e/otlp_receiver.py): the cross-process form of the SDK's in-memory
exporter.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess

import grpc
import httpx
import pytest

from pdserve.v1 import common_pb2 as cpb
from pdserve.v1 import inference_pb2 as ipb
from pdserve.v1 import inference_pb2_grpc
from tests.e2e import processes
from tests.e2e.cluster.test_kv_transfer import _metric, _scrape
from tests.e2e.conftest import Cluster
from tests.e2e.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.e2e.prompts import COMPLETION_CASES, SERVED_NAME

pytestmark = pytest.mark.e2e

ROUTER_SPANS = {"tokenize", "admission", "schedule", "prefill", "decode"}
PREFILL_SPANS = {"worker.prefill", "queue", "prefill_compute"}
DECODE_SPANS = {"worker.decode", "kv_transfer", "first_token", "decode_compute"}
# Span times from different processes on one host share the wall clock; worker stage
# times are vLLM's monotonic stamps converted to it (microsecond error).
CLOCK_SLACK_NS = 1_000_000
KV_BYTES = "pdserve_worker_kv_transfer_bytes_total"


def _traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


def _one(spans: list[ReceivedSpan], service: str, name: str) -> ReceivedSpan:
    found = [s for s in spans if s.service == service and s.name == name]
    assert len(found) == 1, (service, name, [(s.service, s.name) for s in spans])
    return found[0]


def _check_nesting(spans: list[ReceivedSpan]) -> None:
    by_id = {s.span_id: s for s in spans}
    for s in spans:
        assert s.start_ns <= s.end_ns, s
        parent = by_id.get(s.parent_id)
        if parent is not None:
            assert parent.start_ns - CLOCK_SLACK_NS <= s.start_ns, (parent.name, s.name)
            assert s.end_ns <= parent.end_ns + CLOCK_SLACK_NS, (parent.name, s.name)


def _dump(spans: list[ReceivedSpan]) -> None:
    """Keep the trace for docs/img (tools/render_trace.py) when PDSERVE_TRACE_DUMP names a file."""
    path = os.environ.get("PDSERVE_TRACE_DUMP")
    if path:
        with open(path, "w") as out:
            json.dump([s.__dict__ for s in spans], out, indent=1)


def test_one_trace_across_processes_with_kv_bytes(cluster: Cluster, otlp: OtlpReceiver) -> None:
    decode_port = cluster.metrics_ports["decode-0"]
    bytes_before = _metric(_scrape(decode_port), KV_BYTES)
    trace_id, client_span, traceparent = _traceparent()
    prompt, max_tokens = COMPLETION_CASES[14]  # long: several KV blocks
    body = {
        "model": SERVED_NAME,
        "prompt": f"trace {trace_id} {prompt}",  # never seen: nothing cached on decode
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    headers = {"traceparent": traceparent, "x-request-id": f"trace-{trace_id[:8]}"}
    r = httpx.post(f"{cluster.http}/v1/completions", json=body, headers=headers, timeout=120)
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == f"trace-{trace_id[:8]}"
    assert r.headers["x-trace-id"] == trace_id
    root_name = "POST /v1/completions"
    spans = otlp.wait_for(trace_id, {root_name} | ROUTER_SPANS | PREFILL_SPANS | DECODE_SPANS)
    assert {s.service for s in spans} == {"pdserve-router", "pdserve-prefill", "pdserve-decode"}

    # One root for the request, whose parent is the client's span.
    root = _one(spans, "pdserve-router", root_name)
    assert root.parent_id == client_span
    assert [s for s in spans if s.parent_id == client_span] == [root]
    assert root.attributes["pdserve.request_id"] == f"trace-{trace_id[:8]}"
    # The tree: router stages under the root; each worker's span under the router's
    # client span for that call; the vLLM-timed stages under the worker spans.
    for name in ROUTER_SPANS:
        assert _one(spans, "pdserve-router", name).parent_id == root.span_id
    router_prefill = _one(spans, "pdserve-router", "prefill")
    router_decode = _one(spans, "pdserve-router", "decode")
    worker_prefill = _one(spans, "pdserve-prefill", "worker.prefill")
    worker_decode = _one(spans, "pdserve-decode", "worker.decode")
    assert worker_prefill.parent_id == router_prefill.span_id
    assert worker_decode.parent_id == router_decode.span_id
    for name in PREFILL_SPANS - {"worker.prefill"}:
        assert _one(spans, "pdserve-prefill", name).parent_id == worker_prefill.span_id
    for name in DECODE_SPANS - {"worker.decode"}:
        assert _one(spans, "pdserve-decode", name).parent_id == worker_decode.span_id
    assert len(spans) == 1 + len(ROUTER_SPANS) + len(PREFILL_SPANS) + len(DECODE_SPANS)
    _check_nesting(spans)
    # Prefill before decode; the KV moves after the prefill finished.
    transfer = _one(spans, "pdserve-decode", "kv_transfer")
    assert router_prefill.end_ns <= router_decode.start_ns
    assert worker_prefill.end_ns <= transfer.start_ns + CLOCK_SLACK_NS

    schedule = _one(spans, "pdserve-router", "schedule")
    assert schedule.attributes["pdserve.mode"] == "disaggregated"
    assert schedule.attributes["pdserve.prefill_worker"] == "prefill-0"
    assert schedule.attributes["pdserve.decode_worker"] == "decode-0"
    assert "first_token" in router_decode.events
    completion_tokens = r.json()["usage"]["completion_tokens"]
    assert router_decode.attributes["pdserve.completion_tokens"] == completion_tokens
    # The KV-transfer span's bytes are what the decode worker's metric counted.
    bytes_after = _metric(_scrape(decode_port), KV_BYTES)
    assert transfer.attributes["pdserve.kv.transport"] == "nixl"
    assert transfer.attributes["pdserve.kv.bytes"] > 0
    assert transfer.attributes["pdserve.kv.bytes"] == bytes_after - bytes_before
    assert transfer.attributes["pdserve.kv.blocks"] >= 2
    assert transfer.attributes["pdserve.timing_source"] == "vllm.RequestStateStats"
    _dump(spans)
    # The router's decode span carries the worker's vLLM-measured stage times too.
    assert router_decode.attributes["pdserve.worker.kv_transfer_ms"] >= 0
    assert router_decode.attributes["pdserve.worker.kv_bytes"] == bytes_after - bytes_before


def test_streamed_and_grpc_requests_get_their_own_traces(
    cluster: Cluster, otlp: OtlpReceiver
) -> None:
    trace_a, span_a, parent_a = _traceparent()
    body = {"model": SERVED_NAME, "prompt": f"stream {trace_a}", "max_tokens": 4, "stream": True}
    with httpx.stream(
        "POST",
        f"{cluster.http}/v1/completions",
        json=body,
        headers={"traceparent": parent_a},
        timeout=120,
    ) as r:
        assert r.status_code == 200
        request_id = r.headers["x-request-id"]
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"

    trace_b, span_b, parent_b = _traceparent()
    with grpc.insecure_channel(cluster.grpc) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        request = ipb.GenerateRequest(
            model=SERVED_NAME, prompt=f"grpc {trace_b}", sampling=cpb.SamplingParams(max_tokens=4)
        )
        call = stub.Generate(request, metadata=(("traceparent", parent_b),), timeout=120)
        assert [m for m in call]
        grpc_request_id = dict(call.trailing_metadata())["x-request-id"]

    for trace_id, client_span, root_name, rid in (
        (trace_a, span_a, "POST /v1/completions", request_id),
        (trace_b, span_b, "pdserve.v1.Inference/Generate", grpc_request_id),
    ):
        spans = otlp.wait_for(trace_id, {root_name, "worker.decode", "decode_compute"})
        root = _one(spans, "pdserve-router", root_name)
        assert root.parent_id == client_span
        assert root.attributes["pdserve.request_id"] == rid
        worker_roots = [s for s in spans if s.name.startswith("worker.")]
        assert {s.attributes["pdserve.request_id"] for s in worker_roots} == {rid}
        _check_nesting(spans)
    assert not {s.span_id for s in otlp.spans(trace_a)} & {s.span_id for s in otlp.spans(trace_b)}


def test_inspect_prints_a_recent_request(cluster: Cluster) -> None:
    body = {"model": SERVED_NAME, "prompt": "inspect me", "max_tokens": 3}
    r = httpx.post(
        f"{cluster.http}/v1/completions",
        json=body,
        headers={"x-request-id": "inspect-1"},
        timeout=120,
    )
    assert r.status_code == 200
    argv = [processes.PYTHON, "-m", "pdserve.cli", "inspect", "inspect-1"]
    argv += ["--router", cluster.http]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("request inspect-1  trace ")
    for name in ("POST /v1/completions", "tokenize", "schedule", "prefill", "decode"):
        assert any(f" {name}" in line for line in lines), (name, out.stdout)
    # The worker-side stage times came back with the calls.
    assert "worker.kv_transfer_ms=" in out.stdout and "worker.prefill_compute_ms=" in out.stdout
    raw = subprocess.run([*argv, "--json"], capture_output=True, text=True, timeout=120)
    assert json.loads(raw.stdout)["request_id"] == "inspect-1"
    missing = subprocess.run(
        [processes.PYTHON, "-m", "pdserve.cli", "inspect", "nope", "--router", cluster.http],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 1 and "no timeline" in missing.stderr
