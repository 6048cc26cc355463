"""The gRPC ``pdserve.v1.Worker`` service, shared by every role."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc

from pdserve import __version__
from pdserve.config import Role, WorkerConfig
from pdserve.decode_worker.stage import DecodeStage
from pdserve.errors import (
    WORKER_VERDICT_KEY,
    InvalidRequestError,
    KvIncompatibleError,
    KvTransferError,
    PdserveError,
    WorkerDrainingError,
    WorkerError,
)
from pdserve.kv_transfer.wire import handle_to_proto, layout_to_proto
from pdserve.logs import set_request_context
from pdserve.metrics import WorkerMetrics
from pdserve.prefill_worker.stage import PrefillStage
from pdserve.tracing import (
    ATTR_CANCELLED,
    ATTR_PROMPT_TOKENS,
    ATTR_REQUEST_ID,
    ATTR_STAGE,
    ATTR_WORKER,
    Tracing,
)
from pdserve.v1 import common_pb2 as cpb
from pdserve.v1 import worker_pb2 as pb
from pdserve.v1 import worker_pb2_grpc
from pdserve.worker.engine import Engine
from pdserve.worker.sampling import finish_reason_to_proto, to_vllm
from pdserve.worker.timings import (
    KvTransferInfo,
    record_stage_spans,
    timings_metadata,
)

log = logging.getLogger(__name__)
# WatchLoad: how often the load is checked (default, floor) and the longest silence.
WATCH_LOAD_INTERVAL_MS = 50
WATCH_LOAD_MIN_INTERVAL_MS = 10
WATCH_LOAD_HEARTBEAT_S = 1.0

# Which stages each role's workers accept. A decode worker may also serve a request
# end to end (the router colocates when disaggregation does not pay).
_STAGES_BY_ROLE: dict[Role, set[int]] = {
    Role.PREFILL: {pb.STAGE_PREFILL},
    Role.DECODE: {pb.STAGE_DECODE, pb.STAGE_FULL},
    Role.BOTH: {pb.STAGE_PREFILL, pb.STAGE_DECODE, pb.STAGE_FULL},
}
_ROLE_TO_PROTO = {
    Role.PREFILL: pb.ROLE_PREFILL,
    Role.DECODE: pb.ROLE_DECODE,
    Role.BOTH: pb.ROLE_BOTH,
}


@dataclass
class _RunState:
    """What one Generate call learned from the engine, for its spans and metrics."""

    stats: Any = None  # vLLM RequestStateStats of the latest output
    kv: KvTransferInfo | None = None


async def _first_within(outputs: AsyncIterator[Any], timeout_s: float) -> AsyncIterator[Any]:
    """``outputs``, failing with ``KvTransferError`` unless the first arrives in time.

    A decode request's first output exists only once its KV has arrived. vLLM waits for a
    stuck NIXL transfer (or handshake) without end, so without this deadline the request
    would hang; with it, the engine aborts it (its blocks are freed) and the router fails
    over to another pair or to colocated serving.
    """
    iterator = aiter(outputs)
    try:
        first = await asyncio.wait_for(anext(iterator), timeout_s)
    except StopAsyncIteration:
        return
    except TimeoutError:
        raise KvTransferError(
            f"the prompt's KV did not arrive within {timeout_s:.0f} s (its lease ran out)"
        ) from None
    yield first
    async for out in iterator:
        yield out


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(
        self,
        config: WorkerConfig,
        engine: Engine,
        metrics: WorkerMetrics,
        tracing: Tracing | None = None,
    ) -> None:
        assert engine.layout is not None and engine.transport is not None, "engine not started"
        self.config = config
        self.engine = engine
        self.metrics = metrics
        self.tracing = tracing or Tracing.disabled()
        self.prefill = PrefillStage(engine.transport, engine.layout)
        self.decode = DecodeStage(engine.transport, engine.layout)
        self.draining = False
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()

    async def Generate(
        self, request: pb.WorkerGenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WorkerGenerateResponse]:
        stage = pb.Stage.Name(request.stage).removeprefix("STAGE_").lower()
        started = time.monotonic()
        status = "error"
        self.in_flight += 1
        self.idle.clear()
        self.metrics.in_flight.labels(self.metrics.role).inc()
        metadata = context.invocation_metadata() or ()
        trace = self.tracing.start_request(
            f"worker.{stage}",
            metadata,
            {
                ATTR_REQUEST_ID: request.request_id,
                ATTR_STAGE: stage,
                ATTR_WORKER: self.config.worker_id,
                ATTR_PROMPT_TOKENS: len(request.prompt_token_ids),
            },
        )
        set_request_context(request.request_id, trace.trace_id)
        # The router asks for stage timings by propagating a trace (its own may be ring-only).
        wants_timings = any(key == "traceparent" for key, _ in metadata)
        state = _RunState()
        try:
            params = self._sampling_params(request)
            first = True
            async for msg in self._run(request, params, state):
                if first:
                    self.metrics.ttft.labels(self.metrics.role, stage).observe(
                        time.monotonic() - started
                    )
                    first = False
                if msg.finish_reason:
                    # The router may close the call as soon as it has the last message.
                    status = "ok"
                yield msg
            status = "ok"
        except PdserveError as e:
            status = type(e).__name__
            trace.fail(e)
            if isinstance(e, KvIncompatibleError):
                self.metrics.kv_incompatible.labels(self.metrics.role).inc()
            log.warning("request %s failed: %s", request.request_id, e.message)
            verdict = ((WORKER_VERDICT_KEY, type(e).__name__),)
            await context.abort(e.grpc_code, e.message, trailing_metadata=verdict)
        except (asyncio.CancelledError, GeneratorExit):
            # The router went away (gRPC cancels the handler, or closes this generator);
            # vLLM's generator aborts the request in the engine (freeing its KV blocks)
            # when the iteration is cancelled or closed.
            if status != "ok":
                status = "cancelled"
                trace.set(ATTR_CANCELLED, True)
            raise
        finally:
            record_stage_spans(trace, request.stage, state.stats, state.kv)
            if state.kv is not None:
                trace.root.set_attributes(state.kv.attributes())
            trace.end()
            if wants_timings and status == "ok":
                context.set_trailing_metadata(
                    (timings_metadata(request.stage, state.stats, state.kv),)
                )
            self.in_flight -= 1
            if self.in_flight == 0:
                self.idle.set()
            self.metrics.in_flight.labels(self.metrics.role).dec()
            self.metrics.requests.labels(self.metrics.role, stage, status).inc()
            self.metrics.e2e.labels(self.metrics.role, stage).observe(time.monotonic() - started)

    def _sampling_params(self, request: pb.WorkerGenerateRequest) -> Any:
        if self.draining:
            raise WorkerDrainingError(f"worker {self.config.worker_id} is draining")
        if request.stage not in _STAGES_BY_ROLE[self.config.role]:
            raise InvalidRequestError(
                f"a {self.config.role.value} worker does not run stage "
                f"{pb.Stage.Name(request.stage)}"
            )
        if not request.prompt_token_ids:
            raise InvalidRequestError("prompt_token_ids is empty")
        if request.stage == pb.STAGE_PREFILL:
            return self.prefill.sampling_params(request.sampling)
        if request.stage == pb.STAGE_DECODE:
            if not request.HasField("kv_handle"):
                raise InvalidRequestError("STAGE_DECODE needs a kv_handle")
            return self.decode.sampling_params(
                request.sampling, request.kv_handle, len(request.prompt_token_ids)
            )
        return to_vllm(request.sampling)

    async def _run(
        self, request: pb.WorkerGenerateRequest, params: Any, state: _RunState
    ) -> AsyncIterator[pb.WorkerGenerateResponse]:
        prompt = list(request.prompt_token_ids)
        completion_tokens = 0
        outputs = self.engine.generate(
            request.request_id, prompt, params, request.cache_salt or None
        )
        if request.stage == pb.STAGE_DECODE:
            outputs = _first_within(outputs, self.decode.kv_wait_s(request.kv_handle))
        async for out in outputs:
            state.stats = out.metrics
            if request.stage == pb.STAGE_DECODE and state.kv is None:
                # The first output exists only once the KV has arrived.
                state.kv = self._kv_obtained(request.kv_handle)
            completion = out.outputs[0]
            completion_tokens += len(completion.token_ids)
            msg = pb.WorkerGenerateResponse(
                text=completion.text, token_ids=list(completion.token_ids)
            )
            if out.finished and completion.finish_reason == "error":
                # vLLM fails a request whose KV load failed (kv_load_failure_policy=fail).
                if request.stage == pb.STAGE_DECODE:
                    raise KvTransferError("the decode engine could not load the prompt's KV")
                raise WorkerError(f"the engine failed request {request.request_id}")
            if out.finished:
                msg.finish_reason = finish_reason_to_proto(completion.finish_reason)
                msg.usage.CopyFrom(
                    cpb.Usage(
                        prompt_tokens=len(prompt),
                        completion_tokens=completion_tokens,
                        cached_prompt_tokens=out.num_cached_tokens or 0,
                    )
                )
                if request.stage == pb.STAGE_PREFILL:
                    handle = self.prefill.handle(out.kv_transfer_params, len(prompt))
                    msg.kv_handle.CopyFrom(handle_to_proto(handle))
                    self.metrics.kv_handles.labels(
                        self.metrics.role, handle.transport, "produced"
                    ).inc()
            elif request.stage == pb.STAGE_PREFILL:
                continue  # the prefill answers once, with the handle
            yield msg
        if request.stage == pb.STAGE_DECODE:
            self.metrics.kv_handles.labels(
                self.metrics.role, request.kv_handle.transport, "consumed"
            ).inc()

    def _kv_obtained(self, handle: pb.KvHandle) -> KvTransferInfo:
        assert self.engine.layout is not None
        blocks = len(handle.block_ids)
        kv = KvTransferInfo(
            transport=handle.transport,
            producer_engine=handle.engine_id,
            blocks=blocks,
            bytes=blocks * self.engine.layout.block_bytes(),
        )
        self.metrics.kv_transfer_bytes.labels(self.metrics.role, kv.transport).inc(kv.bytes)
        return kv

    async def Abort(
        self, request: pb.AbortRequest, context: grpc.aio.ServicerContext
    ) -> pb.AbortResponse:
        await self.engine.abort(request.request_id)
        return pb.AbortResponse(found=True)

    async def GetLoad(
        self, request: pb.GetLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.LoadReport:
        load = self.engine.load
        return pb.LoadReport(
            running_requests=load.running,
            waiting_requests=load.waiting,
            kv_cache_usage=load.kv_cache_usage,
            draining=self.draining,
        )

    async def WatchLoad(
        self, request: pb.WatchLoadRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.LoadReport]:
        interval_s = (request.interval_ms or WATCH_LOAD_INTERVAL_MS) / 1000
        interval_s = max(interval_s, WATCH_LOAD_MIN_INTERVAL_MS / 1000)
        last: pb.LoadReport | None = None
        last_sent = 0.0
        while True:
            report = await self.GetLoad(pb.GetLoadRequest(), context)
            now = time.monotonic()
            if report != last or now - last_sent >= WATCH_LOAD_HEARTBEAT_S:
                yield report
                last, last_sent = report, now
            await asyncio.sleep(interval_s)

    async def GetInfo(
        self, request: pb.GetInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.WorkerInfo:
        assert self.engine.layout is not None
        info = pb.WorkerInfo(
            worker_id=self.config.worker_id,
            role=_ROLE_TO_PROTO[self.config.role],
            model_id=self.config.engine.served_model_name,
            max_model_len=self.engine.max_model_len,
            version=__version__,
            kv_transport=self.config.kv_transport.value,
        )
        layout_to_proto(self.engine.layout, info.kv_layout)
        if self.config.kv_events_port is not None:
            info.kv_events_endpoint = f"tcp://*:{self.config.kv_events_port}"
            info.kv_events_replay_endpoint = f"tcp://*:{self.config.kv_events_port + 1}"
        return info
