"""A fake worker whose "model" is deterministic in its prompt, with injectable faults.

Real gRPC, no engine. Token ``t+1`` always follows token ``t`` (mod VOCAB), so a stream
continued from "prompt + tokens so far" on another worker yields exactly the tokens an
undisturbed stream would have: what greedy decoding guarantees for a real model, and
what migration relies on. Text of a token is ``TOY_TEXT(id)``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import grpc

from pdserve.errors import WORKER_VERDICT_KEY
from pdserve.v1 import common_pb2 as cpb
from pdserve.v1 import worker_pb2 as pb
from pdserve.v1 import worker_pb2_grpc

VOCAB = 500
MAX_MODEL_LEN = 256


def toy_text(token_id: int) -> str:
    return f" t{token_id}"


class ToyDecoder:
    """The router-side tokenizer of the toy model (router/migration.py TextDecoder)."""

    def decode(self, token_ids: Sequence[int]) -> str:
        return "".join(toy_text(t) for t in token_ids)


def continuation(prompt: Sequence[int], n: int) -> list[int]:
    """The tokens the toy model generates after ``prompt``."""
    return [(prompt[-1] + 1 + i) % VOCAB for i in range(n)]


class ToyWorker(worker_pb2_grpc.WorkerServicer):
    def __init__(
        self,
        role: int,
        model_id: str,
        worker_id: str | None = None,
        max_model_len: int = MAX_MODEL_LEN,
    ) -> None:
        self.role = role
        self.model_id = model_id
        self.worker_id = worker_id or f"toy-{role}-{id(self)}"
        self.max_model_len = max_model_len
        self.requests: list[pb.WorkerGenerateRequest] = []
        self.fail_with: grpc.StatusCode | None = None  # refuse every Generate
        # fail_with as the worker's own verdict (a live worker's error, e.g. a failed KV
        # pull), or bare: what a caller sees when the worker's process died.
        self.fail_as_verdict = False
        self.die_after: int | None = None  # abort UNAVAILABLE after this many tokens
        self.hang_after: int | None = None  # stop answering after this many tokens
        self.hang_health = False  # GetLoad never answers (a SIGSTOPped worker)
        self.token_delay_s = 0.0
        self.started = asyncio.Event()  # set when a stream sent its first token
        self.cancelled = 0  # streams the router cancelled
        self.draining = False  # refuse new streams, report draining (SIGTERM)
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()

    async def Generate(
        self, request: pb.WorkerGenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WorkerGenerateResponse]:
        self.requests.append(request)
        if self.fail_with is not None:
            verdict = ((WORKER_VERDICT_KEY, "KvTransferError"),) if self.fail_as_verdict else ()
            await context.abort(self.fail_with, "injected failure", trailing_metadata=verdict)
        if self.draining:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "worker is draining")
        self.in_flight += 1
        self.idle.clear()
        try:
            async for msg in self._generate(request, context):
                yield msg
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self.idle.set()

    async def _generate(
        self, request: pb.WorkerGenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WorkerGenerateResponse]:
        prompt = list(request.prompt_token_ids)
        if request.stage == pb.STAGE_PREFILL:
            await asyncio.sleep(self.token_delay_s)  # the prefill's one token
            handle = pb.KvHandle(
                transport="nixl", model_id=self.model_id, num_prompt_tokens=len(prompt)
            )
            yield pb.WorkerGenerateResponse(kv_handle=handle, token_ids=[1])
            return
        tokens = continuation(prompt, request.sampling.max_tokens)
        # Like vLLM's detokenizer: stop strings are looked for in this worker's own output,
        # and the last len(longest stop) - 1 characters are held back until known safe.
        stops = list(request.sampling.stop)
        hold = max((len(x) for x in stops), default=1) - 1
        out, sent = "", 0
        try:
            for i, token in enumerate(tokens):
                if self.die_after is not None and i == self.die_after:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "injected crash")
                if self.hang_after is not None and i == self.hang_after:
                    await asyncio.sleep(3600)
                if self.token_delay_s:
                    await asyncio.sleep(self.token_delay_s)
                new_start = max(0, len(out) - hold)
                out += toy_text(token)
                finish = cpb.FINISH_REASON_LENGTH if i == len(tokens) - 1 else None
                hits = [out.find(x, new_start) for x in stops if out.find(x, new_start) >= 0]
                if hits:
                    out, finish = out[: min(hits)], cpb.FINISH_REASON_STOP
                limit = len(out) if finish is not None else max(sent, len(out) - hold)
                msg = pb.WorkerGenerateResponse(text=out[sent:limit], token_ids=[token])
                sent = limit
                if finish is not None:
                    msg.finish_reason = finish
                    msg.usage.CopyFrom(
                        cpb.Usage(prompt_tokens=len(prompt), completion_tokens=i + 1)
                    )
                yield msg
                self.started.set()
                if finish is not None:
                    return
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def GetInfo(
        self, request: pb.GetInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.WorkerInfo:
        return pb.WorkerInfo(
            worker_id=self.worker_id,
            role=self.role,
            model_id=self.model_id,
            max_model_len=self.max_model_len,
        )

    async def GetLoad(
        self, request: pb.GetLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.LoadReport:
        if self.hang_health:
            await asyncio.sleep(3600)
        return pb.LoadReport(running_requests=self.in_flight, draining=self.draining)


async def serve_toy(worker: ToyWorker) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    worker_pb2_grpc.add_WorkerServicer_to_server(worker, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def serve_toy_at(worker: ToyWorker, address: str) -> grpc.aio.Server:
    server = grpc.aio.server()
    worker_pb2_grpc.add_WorkerServicer_to_server(worker, server)
    server.add_insecure_port(address)
    await server.start()
    return server
