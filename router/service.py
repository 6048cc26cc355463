"""The serving pipeline behind both client APIs: validate -> plan -> prefill -> decode.

HTTP and gRPC front ends translate their requests into a ``GenerateCall`` and stream the
``Delta`` values this service yields; P/D is a plan, not a second code path.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from pdserve.errors import (
    ContextLengthError,
    InvalidRequestError,
    KvTransferError,
    ModelNotFoundError,
    NoCapacityError,
    WorkerError,
    from_grpc_error,
)
from pdserve.metrics import RouterMetrics
from pdserve.router.first_transfer import FirstTransferGate
from pdserve.router.planner import Mode, Plan, Planner
from pdserve.router.workers import WorkerClient, WorkerPool
from pdserve.sampling import FINISH_REASON_NAMES
from pdserve.v1 import common_pb2 as cpb
from pdserve.v1 import worker_pb2 as pb

log = logging.getLogger(__name__)

# Routing-decision label for requests that fell back from disaggregated to colocated.
FALLBACK_COLOCATED = "fallback_colocated"


@dataclass(frozen=True)
class GenerateCall:
    request_id: str
    prompt_token_ids: list[int]
    sampling: cpb.SamplingParams
    arrival: float  # time.monotonic() when the request arrived


@dataclass
class Delta:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    usage: cpb.Usage | None = None


class GenerationService:
    def __init__(
        self,
        model_id: str,
        pool: WorkerPool,
        planner: Planner,
        metrics: RouterMetrics,
        default_max_model_len: int,
    ) -> None:
        self.model_id = model_id
        self.pool = pool
        self.planner = planner
        self.metrics = metrics
        self.default_max_model_len = default_max_model_len
        self.first_transfers = FirstTransferGate()

    @property
    def max_model_len(self) -> int:
        return self.pool.max_model_len or self.default_max_model_len

    def check_model(self, model: str) -> None:
        if model != self.model_id:
            raise ModelNotFoundError(
                f"the model {model!r} does not exist; this server serves {self.model_id!r}",
                param="model",
            )

    def resolve_max_tokens(self, prompt_len: int, max_tokens: int | None) -> int:
        """Validate lengths before any worker is touched; default max_tokens fills the context."""
        if prompt_len == 0:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        room = self.max_model_len - prompt_len
        if room <= 0:
            raise ContextLengthError(
                f"the prompt has {prompt_len} tokens; this model's context is "
                f"{self.max_model_len} tokens and at least one must be left to generate",
                param="prompt",
            )
        if max_tokens is None:
            return room
        if max_tokens < 1:
            raise InvalidRequestError("max_tokens must be at least 1", param="max_tokens")
        if max_tokens > room:
            raise ContextLengthError(
                f"max_tokens={max_tokens} plus the prompt's {prompt_len} tokens exceeds the "
                f"model's context of {self.max_model_len} tokens; ask for at most {room}",
                param="max_tokens",
            )
        return max_tokens

    async def generate(self, call: GenerateCall) -> AsyncIterator[Delta]:
        plan = self.planner.plan(call.prompt_token_ids)
        self.metrics.routing.labels(plan.mode.value).inc()
        workers = [w for w in (plan.prefill, plan.decode) if w is not None]
        for w in workers:
            w.in_flight += 1
        try:
            if plan.mode is Mode.DISAGGREGATED:
                streamed = False
                try:
                    async for delta in self._disaggregated(plan, call):
                        streamed = True
                        yield delta
                    return
                except (KvTransferError, NoCapacityError, WorkerError) as e:
                    if streamed:
                        raise
                    # Nothing reached the client yet: the decode worker can still serve
                    # the request alone, recomputing the prompt instead of pulling it.
                    log.warning(
                        "request %s: disaggregated path failed before the first token (%s); "
                        "retrying colocated on %s",
                        call.request_id,
                        e.message,
                        plan.decode.name,
                    )
                    self.metrics.routing.labels(FALLBACK_COLOCATED).inc()
                    plan = Plan(Mode.COLOCATED, decode=plan.decode)
                    call = dataclasses.replace(call, request_id=call.request_id + "-colocated")
            request = self._worker_request(call, pb.STAGE_FULL)
            async for delta in self._stream(plan, request, call):
                yield delta
        finally:
            for w in workers:
                w.in_flight -= 1

    async def _disaggregated(self, plan: Plan, call: GenerateCall) -> AsyncIterator[Delta]:
        assert plan.prefill is not None
        pair = (plan.prefill.address, plan.decode.address)
        opener = await self.first_transfers.enter(pair)
        try:
            request = self._worker_request(call, pb.STAGE_DECODE)
            request.kv_handle.CopyFrom(await self._prefill(plan.prefill, call))
            async for delta in self._stream(plan, request, call):
                if opener:
                    self.first_transfers.done(pair, ok=True)
                    opener = False
                yield delta
        finally:
            if opener:
                self.first_transfers.done(pair, ok=False)

    @staticmethod
    def _worker_request(call: GenerateCall, stage: pb.Stage) -> pb.WorkerGenerateRequest:
        return pb.WorkerGenerateRequest(
            request_id=call.request_id,
            prompt_token_ids=call.prompt_token_ids,
            sampling=call.sampling,
            stage=stage,
        )

    async def _prefill(self, worker: WorkerClient, call: GenerateCall) -> pb.KvHandle:
        request = self._worker_request(call, pb.STAGE_PREFILL)
        handle: pb.KvHandle | None = None
        async for msg in self._worker_stream(worker, request):
            if msg.HasField("kv_handle"):
                handle = msg.kv_handle
        # The router does not trust a worker's reply blindly.
        if handle is None or not handle.transport:
            raise KvTransferError(f"prefill worker {worker.name} returned no KV handle")
        if (
            handle.num_prompt_tokens != len(call.prompt_token_ids)
            or handle.model_id != self.model_id
        ):
            raise KvTransferError(
                f"prefill worker {worker.name} returned a KV handle for another request "
                f"({handle.num_prompt_tokens} tokens of {handle.model_id!r})"
            )
        return handle

    async def _stream(
        self, plan: Plan, request: pb.WorkerGenerateRequest, call: GenerateCall
    ) -> AsyncIterator[Delta]:
        mode = plan.mode.value
        last = None
        async for msg in self._worker_stream(plan.decode, request):
            now = time.monotonic()
            if msg.token_ids:
                if last is None:
                    self.metrics.ttft.labels(mode).observe(now - call.arrival)
                else:
                    self.metrics.itl.labels(mode).observe((now - last) / len(msg.token_ids))
                last = now
            finish = FINISH_REASON_NAMES.get(msg.finish_reason)
            usage = msg.usage if msg.HasField("usage") else None
            if usage is not None:
                self.metrics.prompt_tokens.inc(usage.prompt_tokens)
                self.metrics.generation_tokens.inc(usage.completion_tokens)
            yield Delta(msg.text, list(msg.token_ids), finish, usage)
            if finish is not None:
                self.metrics.e2e.labels(mode).observe(time.monotonic() - call.arrival)

    async def _worker_stream(
        self, worker: WorkerClient, request: pb.WorkerGenerateRequest
    ) -> AsyncIterator[pb.WorkerGenerateResponse]:
        """Stream from a worker; errors become typed errors; leaving early cancels the call
        (the worker then aborts the request and frees its KV blocks)."""
        call = worker.stub.Generate(request)
        try:
            async for msg in call:
                yield msg
        except grpc.aio.AioRpcError as e:
            if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                log.warning("worker %s failed request %s: %s", worker.name, request.request_id, e)
                raise NoCapacityError(
                    f"worker {worker.name} is unavailable ({e.details()}); retry the request"
                ) from e
            raise from_grpc_error(e.code(), e.details() or "") from e
        finally:
            call.cancel()
