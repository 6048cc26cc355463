"""The router's OpenAI HTTP API over real gRPC to fake workers: framing, errors, P/D flow."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from pdserve.models import resolve_model
from pdserve.router.api.http import build_http_app
from pdserve.router.tokenize import PromptTokenizer
from pdserve.router.workers import WorkerPool
from pdserve.v1 import worker_pb2 as pb
from tests.unit.fake_worker import WORDS, FakeWorker, fake_router

MODEL = "fake-model"


@dataclass
class Setup:
    client: httpx.AsyncClient
    prefill: FakeWorker
    decode: FakeWorker
    pool: WorkerPool


@pytest.fixture(scope="module")
def tokenizer() -> PromptTokenizer:
    return PromptTokenizer(str(resolve_model("tiny")))


@pytest.fixture
async def setup(tokenizer: PromptTokenizer) -> AsyncIterator[Setup]:
    prefill, decode = FakeWorker(pb.ROLE_PREFILL, MODEL), FakeWorker(pb.ROLE_DECODE, MODEL)
    async with fake_router(prefill, decode, MODEL) as router:
        app = build_http_app(
            router.service, tokenizer, router.metrics.registry, router.planner.can_serve, 1024
        )
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
            yield Setup(client, prefill, decode, router.pool)


async def test_completion_goes_prefill_then_decode(setup: Setup) -> None:
    r = await setup.client.post(
        "/v1/completions",
        json={
            "model": MODEL,
            "prompt": "The quick brown fox",
            "max_tokens": 3,
            "return_token_ids": True,
        },
        headers={"x-request-id": "req-1"},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert r.headers["x-request-id"] == "req-1"
    assert body["object"] == "text_completion" and body["model"] == MODEL
    choice = body["choices"][0]
    assert choice["text"] == "".join(WORDS[:3]) and choice["finish_reason"] == "length"
    assert choice["token_ids"] == [100, 101, 102]
    assert body["usage"]["completion_tokens"] == 3
    assert [r.stage for r in setup.prefill.requests] == [pb.STAGE_PREFILL]
    decode_request = setup.decode.requests[0]
    assert decode_request.stage == pb.STAGE_DECODE
    assert decode_request.kv_handle.num_prompt_tokens == len(decode_request.prompt_token_ids)
    assert decode_request.request_id == "req-1"


async def test_streaming_chat_framing(setup: Setup) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with setup.client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == "".join(WORDS)
    finishes = [e["choices"][0]["finish_reason"] for e in events if e["choices"]]
    assert finishes[-1] == "stop" and all(f is None for f in finishes[:-1])
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == len(WORDS)
    assert all(e["object"] == "chat.completion.chunk" for e in events)


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "nope", "prompt": "x"}, 404, "model"),
        ({"model": MODEL, "prompt": "x", "max_tokens": 64}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": ""}, 400, "prompt"),
        ({"model": MODEL, "prompt": "x", "n": 2}, 400, "n"),
        ({"model": MODEL, "prompt": "x", "stop": ["a"] * 17}, 400, "stop"),
        ({"model": MODEL, "prompt": [999999]}, 400, "prompt"),
        ({"model": MODEL, "prompt": "x", "logprobs": 2}, 400, "logprobs"),
        ({"model": MODEL}, 400, "prompt"),
    ],
)
async def test_errors_are_openai_shaped(
    setup: Setup, body: dict[str, object], status: int, param: str
) -> None:
    r = await setup.client.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["code"] == status and error["message"]
    assert not setup.decode.requests  # validation happens before any worker is touched


async def test_body_size_limit_and_bad_json(setup: Setup) -> None:
    r = await setup.client.post(
        "/v1/completions", content=b"x" * 2048, headers={"content-type": "application/json"}
    )
    assert r.status_code == 413
    r = await setup.client.post(
        "/v1/completions", content=b"{", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


async def test_worker_errors_map_to_status_codes(setup: Setup) -> None:
    setup.decode.fail_with = grpc.StatusCode.FAILED_PRECONDITION
    r = await setup.client.post(
        "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}
    )
    assert r.status_code == 500 and r.json()["error"]["type"] == "kv_incompatible"
    setup.decode.fail_with = grpc.StatusCode.INTERNAL
    r = await setup.client.post(
        "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}
    )
    assert r.status_code == 502


async def test_readiness_follows_the_pool(setup: Setup) -> None:
    assert (await setup.client.get("/ready")).status_code == 200
    for w in setup.pool.workers:
        w.healthy = False
    assert (await setup.client.get("/ready")).status_code == 503
    r = await setup.client.post("/v1/completions", json={"model": MODEL, "prompt": "hi"})
    assert r.status_code == 503
    metrics = (await setup.client.get("/metrics")).text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
    }
    # The fake router prefills round robin and decodes least-load.
    labels = {"route": "/v1/completions", "status": "503", "policy": "round_robin/least_load"}
    assert samples[("pdserve_router_requests_total", tuple(sorted(labels.items())))] == 1.0


async def test_models(setup: Setup) -> None:
    data = (await setup.client.get("/v1/models")).json()["data"]
    assert [m["id"] for m in data] == [MODEL] and data[0]["max_model_len"] == 64


async def test_failed_prefill_falls_back_to_colocated(setup: Setup) -> None:
    """Nothing was streamed yet, so the decode worker serves the request alone."""
    setup.prefill.fail_with = grpc.StatusCode.UNAVAILABLE
    r = await setup.client.post(
        "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == "".join(WORDS[:2])
    assert [req.stage for req in setup.decode.requests] == [pb.STAGE_FULL]
    assert setup.decode.requests[0].request_id.endswith("-colocated")
    metrics = (await setup.client.get("/metrics")).text
    assert 'pdserve_router_routing_decisions_total{mode="fallback_colocated"} 1.0' in metrics


async def test_a_client_hang_up_cancels_the_worker_call_at_once(
    tokenizer: PromptTokenizer,
) -> None:
    """Over a real socket: the worker's stream is cancelled when the client hangs up, not
    when the garbage collector reaches the abandoned response (or never, if the request
    finishes first)."""
    prefill, decode = FakeWorker(pb.ROLE_PREFILL, MODEL), FakeWorker(pb.ROLE_DECODE, MODEL)
    decode.token_delay_s = 1.0  # 7 tokens: the stream would run for 7 s
    async with fake_router(prefill, decode, MODEL) as router:
        app = build_http_app(
            router.service, tokenizer, router.metrics.registry, router.planner.can_serve, 1024
        )
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            for _ in range(1000):
                if server.started:
                    break
                await asyncio.sleep(0.01)
            body = {"model": MODEL, "prompt": "The quick brown fox", "stream": True}
            base = f"http://127.0.0.1:{port}"
            async with (
                httpx.AsyncClient(base_url=base) as client,
                client.stream("POST", "/v1/completions", json=body) as r,
            ):
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        break  # hang up after the first event
            for _ in range(300):  # the worker must see it long before its 7 s are over
                if decode.cancelled:
                    break
                await asyncio.sleep(0.01)
            assert (decode.cancelled, decode.finished) == (1, 0)
            assert router.pool.workers[-1].in_flight == 0
            assert router.service.admission.in_flight == 0
        finally:
            server.should_exit = True
            await serving
