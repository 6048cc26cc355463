"""A fake pdserve Worker (real gRPC, canned tokens) for router unit tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc
from prometheus_client import CollectorRegistry

from pdserve.config import Role
from pdserve.metrics import RouterMetrics
from pdserve.router.planner import Planner
from pdserve.router.scheduling.policy import make_policy
from pdserve.router.service import GenerationService
from pdserve.router.workers import WorkerPool
from pdserve.v1 import common_pb2 as cpb
from pdserve.v1 import worker_pb2 as pb
from pdserve.v1 import worker_pb2_grpc

WORDS = ["Hello", " world", ",", " this", " is", " pdserve", "."]


class FakeWorker(worker_pb2_grpc.WorkerServicer):
    """Streams WORDS (one token id per word, ids 100+i); PREFILL returns a KV handle."""

    def __init__(self, role: int, model_id: str, fail_with: grpc.StatusCode | None = None) -> None:
        self.role = role
        self.model_id = model_id
        self.fail_with = fail_with
        self.requests: list[pb.WorkerGenerateRequest] = []
        self.token_delay_s = 0.0  # before each decoded token
        self.cancelled = 0  # streams the router cancelled
        self.finished = 0  # streams that sent their last token

    async def Generate(
        self, request: pb.WorkerGenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WorkerGenerateResponse]:
        self.requests.append(request)
        if self.fail_with is not None:
            await context.abort(self.fail_with, "injected failure")
        n = len(request.prompt_token_ids)
        if request.stage == pb.STAGE_PREFILL:
            handle = pb.KvHandle(transport="nixl", model_id=self.model_id, num_prompt_tokens=n)
            yield pb.WorkerGenerateResponse(kv_handle=handle, token_ids=[1])
            return
        count = min(request.sampling.max_tokens, len(WORDS))
        try:
            for i in range(count):
                await asyncio.sleep(self.token_delay_s)
                msg = pb.WorkerGenerateResponse(text=WORDS[i], token_ids=[100 + i])
                if i == count - 1:
                    finish = (
                        cpb.FINISH_REASON_LENGTH if count < len(WORDS) else cpb.FINISH_REASON_STOP
                    )
                    msg.finish_reason = finish
                    msg.usage.CopyFrom(cpb.Usage(prompt_tokens=n, completion_tokens=count))
                    self.finished += 1
                yield msg
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled += 1
            raise

    async def GetInfo(
        self, request: pb.GetInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.WorkerInfo:
        return pb.WorkerInfo(
            worker_id=f"fake-{self.role}", role=self.role, model_id=self.model_id, max_model_len=64
        )

    async def GetLoad(
        self, request: pb.GetLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.LoadReport:
        return pb.LoadReport()


async def serve_fake(worker: FakeWorker) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    worker_pb2_grpc.add_WorkerServicer_to_server(worker, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@dataclass(frozen=True)
class FakeRouter:
    """A router's generation service over one fake prefill and one fake decode worker."""

    service: GenerationService
    planner: Planner
    metrics: RouterMetrics
    pool: WorkerPool


@asynccontextmanager
async def fake_router(
    prefill: FakeWorker, decode: FakeWorker, model: str, poll_interval_s: float = 0.1
) -> AsyncIterator[FakeRouter]:
    """Serve both workers over real gRPC and build the router around them (round robin
    prefill, least-load decode, context 64); everything stops on exit."""
    (ps, paddr), (ds, daddr) = await serve_fake(prefill), await serve_fake(decode)
    pool = WorkerPool(model, rpc_timeout_s=2, poll_interval_s=poll_interval_s)
    pool.add([paddr], Role.PREFILL)
    pool.add([daddr], Role.DECODE)
    try:
        await pool.poll_once()
        metrics = RouterMetrics(CollectorRegistry())
        planner = Planner(pool, make_policy("round_robin"), make_policy("least_load"))
        service = GenerationService(model, pool, planner, metrics, default_max_model_len=64)
        yield FakeRouter(service, planner, metrics, pool)
    finally:
        await pool.close()
        await ps.stop(None)
        await ds.stop(None)
