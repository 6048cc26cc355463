"""The router's public gRPC API: ``pdserve.v1.Inference`` (plus health and reflection)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc

from pdserve.errors import InvalidRequestError, PdserveError
from pdserve.logs import request_id_from, set_request_context
from pdserve.router.api.http import ROUTE_HEADER, SESSION_HEADER
from pdserve.router.service import GenerateCall, GenerationService
from pdserve.router.tokenize import PromptTokenizer
from pdserve.sampling import FINISH_REASON_BY_NAME
from pdserve.tracing import ATTR_PROMPT_TOKENS, ATTR_REQUEST_ID, Tracing
from pdserve.v1 import common_pb2 as cpb
from pdserve.v1 import inference_pb2 as pb
from pdserve.v1 import inference_pb2_grpc

REQUEST_ID_KEY = "x-request-id"


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(
        self,
        service: GenerationService,
        tokenizer: PromptTokenizer,
        tracing: Tracing | None = None,
    ) -> None:
        self.service = service
        self.tokenizer = tokenizer
        self.tracing = tracing or Tracing.disabled()

    def _prompt_ids(self, request: pb.GenerateRequest) -> list[int]:
        kind = request.WhichOneof("input")
        if kind == "prompt":
            return self.tokenizer.encode_prompt(request.prompt)
        if kind == "chat":
            messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
            add = (
                request.chat.add_generation_prompt
                if request.chat.HasField("add_generation_prompt")
                else True
            )
            return self.tokenizer.encode_chat(messages, add)
        if kind == "tokens":
            return self.tokenizer.check_token_ids(request.tokens.token_ids)
        raise InvalidRequestError("set one of prompt, chat or tokens")

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        route, status = "grpc/Generate", "OK"
        metadata = context.invocation_metadata() or ()
        # The request id: the message's field, else x-request-id metadata, if sane.
        request_id = request_id_from(
            request.request_id or next((v for k, v in metadata if k == REQUEST_ID_KEY), None)
        )
        # The id goes back in trailing metadata, whatever the outcome.
        context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
        trace = self.tracing.start_request(
            "pdserve.v1.Inference/Generate", metadata, {ATTR_REQUEST_ID: request_id}
        )
        set_request_context(request_id, trace.trace_id)
        try:
            with trace.span("tokenize"):
                self.service.check_model(request.model)
                prompt_ids = self._prompt_ids(request)
            trace.set(ATTR_PROMPT_TOKENS, len(prompt_ids))
            requested = request.sampling.max_tokens or None
            sampling = cpb.SamplingParams()
            sampling.CopyFrom(request.sampling)
            sampling.max_tokens = self.service.resolve_max_tokens(len(prompt_ids), requested)
            session = next((v for k, v in metadata if k == SESSION_HEADER), None)
            call = GenerateCall(
                request_id,
                prompt_ids,
                sampling,
                time.monotonic(),
                trace,
                session_key=session,
                cache_salt=self.service.tenancy.salt_from_metadata(metadata),
            )
            async for delta in self.service.generate(call):
                if delta.route:
                    context.set_trailing_metadata(
                        ((REQUEST_ID_KEY, request_id), (ROUTE_HEADER, delta.route))
                    )
                msg = pb.GenerateResponse(
                    request_id=request_id, text=delta.text, token_ids=delta.token_ids
                )
                if delta.finish_reason is not None:
                    msg.finish_reason = FINISH_REASON_BY_NAME[delta.finish_reason]
                if delta.usage is not None:
                    msg.usage.CopyFrom(delta.usage)
                yield msg
        except PdserveError as e:
            status = e.grpc_code.name
            trace.fail(e)
            await context.abort(e.grpc_code, e.message)
        finally:
            trace.end()
            policy = self.service.planner.policy_name
            self.service.metrics.requests.labels(route, status, policy).inc()

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        model = pb.Model(id=self.service.model_id, max_model_len=self.service.max_model_len)
        return pb.ListModelsResponse(models=[model])
