"""Admission control (429 + Retry-After, bounded queue) and API keys over HTTP and gRPC,
against the real router front ends and toy workers over real gRPC."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import httpx
import pytest
from prometheus_client import CollectorRegistry

from pdserve.config import AdmissionConfig, AuthConfig, Role
from pdserve.errors import OverloadedError, UnauthenticatedError
from pdserve.metrics import RouterMetrics
from pdserve.models import resolve_model
from pdserve.router.admission import Admission
from pdserve.router.api.grpc import InferenceServicer
from pdserve.router.api.http import build_http_app
from pdserve.router.auth import ApiKeys, bearer_token
from pdserve.router.grpc_guard import router_interceptors
from pdserve.router.planner import Planner
from pdserve.router.scheduling.policy import make_policy
from pdserve.router.service import GenerationService
from pdserve.router.tokenize import PromptTokenizer
from pdserve.router.workers import WorkerPool
from pdserve.v1 import inference_pb2 as ipb
from pdserve.v1 import inference_pb2_grpc
from pdserve.v1 import worker_pb2 as pb
from tests.unit.fake_lm import MAX_MODEL_LEN, ToyWorker, serve_toy

MODEL = "toy"
KEY = "sk-test-0123456789"


@pytest.fixture(scope="module")
def tokenizer() -> PromptTokenizer:
    return PromptTokenizer(str(resolve_model("tiny")))


@dataclass
class Router:
    http: httpx.AsyncClient
    grpc_target: str
    worker: ToyWorker
    metrics: RouterMetrics


async def start_router(
    tokenizer: PromptTokenizer, admission: AdmissionConfig, auth: AuthConfig
) -> AsyncIterator[Router]:
    worker = ToyWorker(pb.ROLE_DECODE, MODEL)
    worker_server, address = await serve_toy(worker)
    pool = WorkerPool(MODEL, rpc_timeout_s=2, poll_interval_s=0.1)
    pool.add([address], Role.DECODE)
    await pool.poll_once()
    metrics = RouterMetrics(CollectorRegistry())
    planner = Planner(pool, make_policy("round_robin"), make_policy("least_load"))
    service = GenerationService(MODEL, pool, planner, metrics, MAX_MODEL_LEN, admission=admission)
    keys = ApiKeys(auth, metrics)
    app = build_http_app(service, tokenizer, metrics.registry, planner.can_serve, 4096)
    if keys.enabled:
        app.middleware("http")(keys.http_middleware())
    grpc_server = grpc.aio.server(interceptors=router_interceptors(keys))
    inference_pb2_grpc.add_InferenceServicer_to_server(
        InferenceServicer(service, tokenizer), grpc_server
    )
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
        yield Router(client, f"127.0.0.1:{port}", worker, metrics)
    await grpc_server.stop(None)
    await pool.close()
    await worker_server.stop(None)


def body(max_tokens: int = 3, stream: bool = False) -> dict[str, object]:
    return {"model": MODEL, "prompt": "hello", "max_tokens": max_tokens, "stream": stream}


async def test_overload_gets_fast_429_with_retry_after(tokenizer: PromptTokenizer) -> None:
    admission = AdmissionConfig(max_in_flight=2, max_queue=1, queue_timeout_s=5, retry_after_s=3)
    async for r in start_router(tokenizer, admission, AuthConfig()):
        r.worker.token_delay_s = 0.05  # 20 tokens: about 1 s per request
        requests = [r.http.post("/v1/completions", json=body(20)) for _ in range(10)]
        started = time.monotonic()
        responses = await asyncio.gather(*requests)
        codes = sorted(x.status_code for x in responses)
        # 2 run, 1 waits for a slot and then runs; the other 7 are refused at once.
        assert codes == [200] * 3 + [429] * 7, codes
        refused = [x for x in responses if x.status_code == 429]
        assert all(x.headers["retry-after"] == "3" for x in refused)
        assert refused[0].json()["error"]["type"] == "rate_limit_error"
        assert len(r.worker.requests) == 3  # refused requests never reached a worker
        assert time.monotonic() - started < 10
        labels = {"reason": "overload"}
        assert (
            r.metrics.registry.get_sample_value("pdserve_router_rejected_requests_total", labels)
            == 7
        )


async def test_queue_timeout_refuses_waiters(tokenizer: PromptTokenizer) -> None:
    admission = AdmissionConfig(max_in_flight=1, max_queue=4, queue_timeout_s=0.2)
    async for r in start_router(tokenizer, admission, AuthConfig()):
        r.worker.token_delay_s = 0.2
        slow = asyncio.create_task(r.http.post("/v1/completions", json=body(5)))
        await r.worker.started.wait()
        waited = await r.http.post("/v1/completions", json=body(1))
        assert (
            waited.status_code == 429 and "no capacity within" in waited.json()["error"]["message"]
        )
        assert (await slow).status_code == 200
        ok = await r.http.post("/v1/completions", json=body(1))  # the slot is free again
        assert ok.status_code == 200


async def test_admission_hands_slots_over_in_order() -> None:
    metrics = RouterMetrics(CollectorRegistry())
    admission = Admission(AdmissionConfig(max_in_flight=1, max_queue=2, queue_timeout_s=5), metrics)
    order: list[int] = []
    release = asyncio.Event()

    async def run(i: int) -> None:
        async with admission.admitted():
            order.append(i)
            await release.wait()

    tasks = [asyncio.create_task(run(i)) for i in range(3)]
    await asyncio.sleep(0.05)
    with pytest.raises(OverloadedError):
        await run(99)
    assert order == [0] and admission.in_flight == 1
    release.set()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2] and admission.in_flight == 0


async def test_http_api_key(tokenizer: PromptTokenizer) -> None:
    async for r in start_router(tokenizer, AdmissionConfig(), AuthConfig(api_keys=(KEY, "other"))):
        missing = await r.http.post("/v1/completions", json=body())
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert missing.json()["error"]["type"] == "authentication_error"
        wrong = await r.http.post(
            "/v1/completions", json=body(), headers={"Authorization": f"Bearer {KEY}x"}
        )
        assert wrong.status_code == 401
        good = await r.http.post(
            "/v1/completions", json=body(), headers={"Authorization": f"Bearer {KEY}"}
        )
        assert good.status_code == 200, good.text
        models = await r.http.get("/v1/models", headers={"Authorization": "Bearer other"})
        assert models.status_code == 200
        assert (await r.http.get("/health")).status_code == 200  # probes carry no key
        assert len(r.worker.requests) == 1


async def test_grpc_api_key(tokenizer: PromptTokenizer) -> None:
    async for r in start_router(tokenizer, AdmissionConfig(), AuthConfig(api_keys=(KEY,))):
        async with grpc.aio.insecure_channel(r.grpc_target) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            request = ipb.GenerateRequest(model=MODEL, prompt="hello")
            request.sampling.max_tokens = 2
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for _ in stub.Generate(request):
                    pass
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as unary:
                await stub.ListModels(ipb.ListModelsRequest(), metadata=[("authorization", "x")])
            assert unary.value.code() == grpc.StatusCode.UNAUTHENTICATED
            metadata = [("authorization", f"Bearer {KEY}")]
            got = [m async for m in stub.Generate(request, metadata=metadata)]
            assert sum(len(m.token_ids) for m in got) == 2


def test_rate_limit_per_key() -> None:
    now = [0.0]
    keys = ApiKeys(
        AuthConfig(api_keys=("a", "b"), rate_limit_rps=2, rate_limit_burst=2),
        RouterMetrics(CollectorRegistry()),
        clock=lambda: now[0],
    )
    keys.authenticate("a")
    keys.authenticate("a")
    with pytest.raises(OverloadedError) as limited:
        keys.authenticate("a")
    assert limited.value.http_headers()["Retry-After"] == "1"
    keys.authenticate("b")  # buckets are per key
    now[0] += 0.5  # one token back at 2/s
    keys.authenticate("a")
    with pytest.raises(UnauthenticatedError):
        keys.authenticate("c")


def test_bearer_token_parsing() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token("Bearer ") is None
    assert bearer_token(None) is None
