"""The worker's spans: the real WorkerServicer over real gRPC, with a fake engine that
streams vLLM-shaped outputs (RequestOutput fields, RequestStateStats timings).

Checks the parent from the router's traceparent, the stage spans from vLLM's timings,
the KV-transfer span's bytes against the worker's byte counter, and the stage timings
returned in trailing metadata.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from pdserve.config import EngineConfig, Role, TracingConfig, WorkerConfig
from pdserve.kv_transfer.metadata import KvLayout
from pdserve.kv_transfer.nixl import NixlTransport
from pdserve.kv_transfer.wire import handle_to_proto
from pdserve.metrics import WorkerMetrics
from pdserve.tracing import Tracing
from pdserve.v1 import common_pb2 as cpb
from pdserve.v1 import worker_pb2 as pb
from pdserve.v1 import worker_pb2_grpc
from pdserve.worker.engine import LoadSnapshot
from pdserve.worker.servicer import WorkerServicer
from pdserve.worker.timings import TIMINGS_METADATA_KEY, parse_timings

LAYOUT = KvLayout("fake-model", "float32", 16, 4, 2, 32, 1, 1)
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


@dataclass
class Stats:
    """The fields of vLLM's RequestStateStats (engine-core monotonic stamps)."""

    queued_ts: float = 0.0
    scheduled_ts: float = 0.0
    first_token_ts: float = 0.0
    last_token_ts: float = 0.0


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None


@dataclass
class Output:
    outputs: list[Completion]
    finished: bool
    metrics: Stats
    num_cached_tokens: int = 0
    kv_transfer_params: dict[str, Any] | None = None


@dataclass
class FakeEngine:
    """Streams like vLLM's AsyncLLM: 3 tokens, or one token and KV params for a prefill."""

    layout: KvLayout = LAYOUT
    transport: NixlTransport = field(default_factory=lambda: NixlTransport(30.0))
    load: LoadSnapshot = field(default_factory=LoadSnapshot)
    max_model_len: int = 512

    kv_never_arrives: bool = False  # decode requests wait forever (a stuck NIXL transfer)
    aborted: list[str] = field(default_factory=list)
    salts: list[str | None] = field(default_factory=list)  # each request's cache_salt

    async def generate(
        self, request_id: str, prompt: list[int], params: Any, cache_salt: str | None = None
    ) -> AsyncIterator[Any]:
        self.salts.append(cache_salt)
        kv = (params.extra_args or {}).get("kv_transfer_params") or {}
        if self.kv_never_arrives and kv.get("do_remote_prefill"):
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.aborted.append(request_id)  # AsyncLLM.generate aborts it here
                raise
        # Stamps taken as time passes, like the engine core's.
        stats = Stats(queued_ts=time.monotonic())
        await asyncio.sleep(0.002)
        stats.scheduled_ts = time.monotonic()
        await asyncio.sleep(0.002)
        if kv.get("do_remote_decode"):
            stats.first_token_ts = stats.last_token_ts = time.monotonic()
            params_out = {
                "remote_engine_id": "prefill-0",
                "remote_block_ids": [[1, 2, 3]],
                "remote_host": "127.0.0.1",
                "remote_port": 5600,
                "remote_request_id": request_id,
            }
            yield Output([Completion("a", [7], "length")], True, stats, 0, params_out)
            return
        for i in range(3):
            if i:
                await asyncio.sleep(0.001)
            stats.last_token_ts = time.monotonic()
            stats.first_token_ts = stats.first_token_ts or stats.last_token_ts
            done = i == 2
            yield Output([Completion("x", [10 + i], "length" if done else None)], done, stats)


@contextlib.asynccontextmanager
async def _serve(
    engine: FakeEngine,
) -> AsyncIterator[tuple[worker_pb2_grpc.WorkerStub, InMemorySpanExporter, Any]]:
    exporter = InMemorySpanExporter()
    tracing = Tracing.create(TracingConfig(), "pdserve-worker", [SimpleSpanProcessor(exporter)])
    config = WorkerConfig(Role.BOTH, EngineConfig("unused", "fake-model"), "both-0")
    metrics = WorkerMetrics(CollectorRegistry(), "both")
    servicer = WorkerServicer(config, engine, metrics, tracing)  # type: ignore[arg-type]
    server = grpc.aio.server()
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield worker_pb2_grpc.WorkerStub(channel), exporter, metrics
    await channel.close()
    await server.stop(None)


@pytest.fixture
async def worker() -> AsyncIterator[tuple[worker_pb2_grpc.WorkerStub, InMemorySpanExporter, Any]]:
    async with _serve(FakeEngine()) as served:
        yield served


def _nixl_handle(lease_s: float = 30.0) -> pb.KvHandle:
    handle = NixlTransport(lease_s).handle_from_prefill(
        {
            "remote_engine_id": "prefill-0",
            "remote_block_ids": [[1, 2, 3]],
            "remote_host": "127.0.0.1",
            "remote_port": 5600,
            "remote_request_id": "r1",
        },
        LAYOUT,
        40,
        now_ms=int(time.time() * 1000),
    )
    return handle_to_proto(handle)


def _request(stage: int, handle: pb.KvHandle | None = None) -> pb.WorkerGenerateRequest:
    req = pb.WorkerGenerateRequest(
        request_id="r1",
        prompt_token_ids=list(range(40)),
        sampling=cpb.SamplingParams(max_tokens=3),
        stage=stage,
    )
    if handle is not None:
        req.kv_handle.CopyFrom(handle)
    return req


async def test_decode_spans_bytes_and_trailing_timings(worker: Any) -> None:
    stub, exporter, metrics = worker
    parent = "00f067aa0ba902b7"
    call = stub.Generate(
        _request(pb.STAGE_DECODE, _nixl_handle()),
        metadata=(("traceparent", f"00-{TRACE}-{parent}-01"),),
    )
    messages = [m async for m in call]
    assert [t for m in messages for t in m.token_ids] == [10, 11, 12]
    timings = parse_timings(dict(await call.trailing_metadata()))
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"worker.decode", "kv_transfer", "first_token", "decode_compute"}
    root = spans["worker.decode"]
    assert root.parent is not None and format(root.parent.span_id, "016x") == parent
    assert format(root.context.trace_id, "032x") == TRACE
    for name in ("kv_transfer", "first_token", "decode_compute"):
        child = spans[name]
        assert child.parent is not None and child.parent.span_id == root.context.span_id
        assert root.start_time <= child.start_time <= child.end_time <= root.end_time
    transfer = spans["kv_transfer"]
    transfer_ns = transfer.end_time - transfer.start_time
    assert transfer_ns >= 2_000_000  # queued -> scheduled, the fake engine's 2 ms sleep
    counted = metrics.kv_transfer_bytes.labels("both", "nixl")._value.get()
    assert transfer.attributes["pdserve.kv.bytes"] == counted == 3 * LAYOUT.block_bytes()
    assert transfer.attributes["pdserve.kv.blocks"] == 3
    assert timings["kv_bytes"] == counted
    assert timings["kv_transfer_ms"] == pytest.approx(transfer_ns / 1e6, abs=0.01)


async def test_prefill_spans_and_no_timings_without_a_trace(worker: Any) -> None:
    stub, exporter, _ = worker
    call = stub.Generate(_request(pb.STAGE_PREFILL))
    (msg,) = [m async for m in call]
    assert msg.kv_handle.transport == "nixl"
    # Without a traceparent the worker still traces (its own root) but returns no timings.
    assert TIMINGS_METADATA_KEY not in dict(await call.trailing_metadata())
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"worker.prefill", "queue", "prefill_compute"}
    assert spans["worker.prefill"].parent is None


def _outcomes(metrics: Any) -> dict[str, float]:
    return {
        s.labels["status"]: s.value
        for family in metrics.requests.collect()
        for s in family.samples
        if s.name.endswith("_total")
    }


async def _finished(metrics: Any, count: int) -> dict[str, float]:
    for _ in range(200):
        outcomes = _outcomes(metrics)
        if sum(outcomes.values()) >= count:
            return outcomes
        await asyncio.sleep(0.01)
    return _outcomes(metrics)


async def test_a_call_closed_after_its_last_message_counts_as_ok(worker: Any) -> None:
    """The router closes the call as soon as it has the finishing message."""
    stub, _, metrics = worker
    call = stub.Generate(_request(pb.STAGE_FULL))
    async for msg in call:
        if msg.finish_reason:
            call.cancel()
            break
    assert await _finished(metrics, 1) == {"ok": 1.0}


async def test_a_call_closed_mid_stream_counts_as_cancelled(worker: Any) -> None:
    stub, _, metrics = worker
    call = stub.Generate(_request(pb.STAGE_FULL))
    async for _ in call:
        call.cancel()  # after the first of three tokens
        break
    assert await _finished(metrics, 1) == {"cancelled": 1.0}


async def test_a_decode_whose_kv_never_arrives_fails_once_its_lease_is_over(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """vLLM waits for a stuck transfer without end; the worker gives up after the lease
    (plus grace), aborts the engine request and answers with a KV transfer error, so the
    router can fail over instead of hanging."""
    monkeypatch.setattr("pdserve.decode_worker.stage.CONSUMER_GRACE_S", 0.2)
    engine = FakeEngine(kv_never_arrives=True)
    async with _serve(engine) as (stub, _, metrics):
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            async for _ in stub.Generate(_request(pb.STAGE_DECODE, _nixl_handle(lease_s=1.0))):
                pass
        waited = time.monotonic() - started
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "did not arrive" in (failed.value.details() or "")
        assert 0.9 < waited < 10, waited  # the lease (1 s) plus grace, not forever
        assert engine.aborted == ["r1"]
        assert await _finished(metrics, 1) == {"KvTransferError": 1.0}
