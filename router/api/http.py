"""OpenAI-compatible HTTP API of the router (FastAPI): completions, chat, models, health."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pdserve.errors import InvalidRequestError, PdserveError
from pdserve.logs import request_id_from, set_request_context
from pdserve.router.api.openai_schema import ChatCompletionRequest, CompletionRequest
from pdserve.router.service import Delta, GenerateCall, GenerationService
from pdserve.router.tenancy import TENANT_HEADER
from pdserve.router.timeline import TimelineRing
from pdserve.router.tokenize import PromptTokenizer
from pdserve.tracing import ATTR_PROMPT_TOKENS, ATTR_REQUEST_ID, ATTR_STREAM, RequestTrace, Tracing
from pdserve.v1 import common_pb2 as cpb

REQUEST_ID_HEADER = "x-request-id"
# How the router served the request: mode, workers, reason, cached tokens (debugging).
ROUTE_HEADER = "x-pdserve-route"
# Session affinity (the ``session`` policy): this header, else the OpenAI ``user`` field.
SESSION_HEADER = "x-session-id"
TRACE_ID_HEADER = "x-trace-id"


def _error_response(err: PdserveError) -> JSONResponse:
    return JSONResponse(err.to_openai(), status_code=err.http_status, headers=err.http_headers())


def _usage_json(usage: cpb.Usage | None) -> dict[str, Any] | None:
    if usage is None:
        return None
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_prompt_tokens},
    }


class _Shape:
    """How one endpoint frames its chunks and final body (completion vs chat)."""

    def __init__(
        self, chat: bool, request_id: str, model: str, prompt_token_ids: list[int] | None
    ) -> None:
        self.chat = chat
        # Set when the client asked for token ids (vLLM's return_token_ids).
        self.prompt_token_ids = prompt_token_ids
        self.id = ("chatcmpl-" if chat else "cmpl-") + request_id
        self.model = model
        self.created = int(time.time())

    def envelope(
        self, choices: list[dict[str, Any]], usage: dict[str, Any] | None, stream: bool
    ) -> dict[str, Any]:
        obj = "chat.completion" if self.chat else "text_completion"
        if stream and self.chat:
            obj = "chat.completion.chunk"
        body: dict[str, Any] = {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if usage is not None or not stream:
            body["usage"] = usage
        return body

    def chunk_choice(self, delta: Delta, first: bool) -> dict[str, Any]:
        if self.chat:
            message: dict[str, Any] = {"content": delta.text} if delta.text else {}
            if first:
                message["role"] = "assistant"
            choice: dict[str, Any] = {"index": 0, "delta": message}
        else:
            choice = {"index": 0, "text": delta.text}
        choice.update(logprobs=None, finish_reason=delta.finish_reason)
        return self._with_token_ids(choice, delta.token_ids, first)

    def final_choice(self, text: str, token_ids: list[int], finish: str | None) -> dict[str, Any]:
        if self.chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
            }
        else:
            choice = {"index": 0, "text": text}
        choice.update(logprobs=None, finish_reason=finish)
        return self._with_token_ids(choice, token_ids, True)

    def _with_token_ids(
        self, choice: dict[str, Any], token_ids: list[int], with_prompt: bool
    ) -> dict[str, Any]:
        if self.prompt_token_ids is not None:
            choice["token_ids"] = token_ids
            if with_prompt:
                choice["prompt_token_ids"] = self.prompt_token_ids
        return choice


def build_http_app(
    service: GenerationService,
    tokenizer: PromptTokenizer,
    metrics_registry: Any,
    ready: Callable[[], bool],
    max_body_bytes: int,
    tracing: Tracing | None = None,
    timelines: TimelineRing | None = None,
) -> FastAPI:
    app = FastAPI(title="pdserve router", version="0.1.0")
    tracing = tracing or Tracing.disabled()
    requests_total = service.metrics.requests

    @app.exception_handler(PdserveError)
    async def _pdserve_error(request: Request, exc: PdserveError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        msg = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            detail = first.get("ctx", {}).get("error", msg)
            return _error_response(
                InvalidRequestError(f"the request body is not valid JSON: {detail}")
            )
        return _error_response(
            InvalidRequestError(f"{loc}: {msg}" if loc else msg, param=loc or None)
        )

    @app.middleware("http")
    async def _limit_body(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body_bytes:
            err = InvalidRequestError(f"request body larger than {max_body_bytes} bytes")
            response: Response = JSONResponse(err.to_openai(), status_code=413)
        else:
            response = await call_next(request)
        route = request.url.path
        if route.startswith("/v1/"):
            policy = service.planner.policy_name
            requests_total.labels(route, str(response.status_code), policy).inc()
        return response

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def readiness() -> Response:
        if ready():
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "not ready"}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(metrics_registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": service.model_id,
                    "object": "model",
                    "created": 0,
                    "owned_by": "pdserve",
                    "max_model_len": service.max_model_len,
                }
            ],
        }

    @app.get("/debug/requests")
    async def debug_requests() -> Response:
        """Request ids of the timelines in the ring, newest first."""
        if timelines is None:
            return JSONResponse({"error": "request timelines are off"}, status_code=404)
        return JSONResponse({"requests": timelines.recent()})

    @app.get("/debug/requests/{request_id}")
    async def debug_request(request_id: str) -> Response:
        """The timeline of a recent request (``pdserve inspect``)."""
        timeline = timelines.get(request_id) if timelines is not None else None
        if timeline is None:
            return JSONResponse({"error": f"no timeline for {request_id!r}"}, status_code=404)
        return JSONResponse(timeline.to_json())

    def _begin(request: Request, route: str, stream: bool) -> tuple[str, RequestTrace]:
        """The request id (the client's if sane) and the root span of the request."""
        request_id = request_id_from(request.headers.get(REQUEST_ID_HEADER))
        trace = tracing.start_request(
            f"POST {route}",
            request.headers,
            {ATTR_REQUEST_ID: request_id, "http.route": route, ATTR_STREAM: stream},
        )
        set_request_context(request_id, trace.trace_id)
        return request_id, trace

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        request_id, trace = _begin(request, "/v1/completions", body.stream)
        try:
            with trace.span("tokenize"):
                service.check_model(body.model)
                body.check_supported()
                if isinstance(body.prompt, str):
                    prompt_ids = tokenizer.encode_prompt(body.prompt)
                elif body.prompt and all(isinstance(p, int) for p in body.prompt):
                    prompt_ids = tokenizer.check_token_ids([int(p) for p in body.prompt])
                elif len(body.prompt) == 1 and isinstance(body.prompt[0], str):
                    prompt_ids = tokenizer.encode_prompt(body.prompt[0])
                else:
                    raise InvalidRequestError(
                        "prompt must be one string or one list of token ids", param="prompt"
                    )
            session = request.headers.get(SESSION_HEADER)
            return await _serve(
                body,
                prompt_ids,
                body.max_tokens,
                False,
                request_id,
                trace,
                session,
                _cache_salt(request),
            )
        except BaseException as e:
            trace.fail(e)
            trace.end()
            raise

    def _cache_salt(request: Request) -> str | None:
        """The tenant's prefix-cache salt (router/tenancy.py); None: the shared cache."""
        headers = request.headers
        return service.tenancy.salt(headers.get("authorization"), headers.get(TENANT_HEADER))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        request_id, trace = _begin(request, "/v1/chat/completions", body.stream)
        try:
            with trace.span("tokenize"):
                service.check_model(body.model)
                body.check_supported()
                prompt_ids = tokenizer.encode_chat(body.message_dicts(), body.add_generation_prompt)
            max_tokens = body.effective_max_tokens()
            session = request.headers.get(SESSION_HEADER)
            return await _serve(
                body,
                prompt_ids,
                max_tokens,
                True,
                request_id,
                trace,
                session,
                _cache_salt(request),
            )
        except BaseException as e:
            trace.fail(e)
            trace.end()
            raise

    async def _serve(
        body: CompletionRequest | ChatCompletionRequest,
        prompt_ids: list[int],
        max_tokens: int | None,
        chat: bool,
        request_id: str,
        trace: RequestTrace,
        session: str | None = None,
        cache_salt: str | None = None,
    ) -> Response:
        """Ends ``trace`` when the response is complete (the stream's end, if streamed)."""
        max_tokens = service.resolve_max_tokens(len(prompt_ids), max_tokens)
        trace.set(ATTR_PROMPT_TOKENS, len(prompt_ids))
        sampling = body.to_sampling(max_tokens)
        call = GenerateCall(
            request_id,
            prompt_ids,
            sampling,
            time.monotonic(),
            trace,
            session_key=session or body.user,
            cache_salt=cache_salt,
        )
        shape = _Shape(
            chat, request_id, service.model_id, prompt_ids if body.return_token_ids else None
        )
        headers = {REQUEST_ID_HEADER: request_id}
        if trace.enabled:
            headers[TRACE_ID_HEADER] = trace.trace_id
        deltas = service.generate(call)
        if body.stream:
            # Fail before the 200 status line when no worker can take the request.
            first = await anext(deltas)
            if first.route:
                headers[ROUTE_HEADER] = first.route
            stream = _sse(shape, first, deltas, body.include_usage_in_stream, trace)
            return _ClosingStreamingResponse(
                stream, media_type="text/event-stream", headers=headers
            )
        text: list[str] = []
        token_ids: list[int] = []
        last = Delta("", [])
        async for delta in deltas:
            text.append(delta.text)
            token_ids += delta.token_ids
            last = delta
            if delta.route:
                headers.setdefault(ROUTE_HEADER, delta.route)
        choice = shape.final_choice("".join(text), token_ids, last.finish_reason)
        response = JSONResponse(
            shape.envelope([choice], _usage_json(last.usage), stream=False), headers=headers
        )
        trace.end()
        return response

    return app


class _ClosingStreamingResponse(StreamingResponse):
    """Closes the event stream when the response ends, also when the client hung up.

    Starlette leaves the body iterator suspended when a send fails on a closed connection;
    the worker calls under it would then be cancelled only when the garbage collector gets
    to it (seconds later, or after the request finished on the engines anyway). Closing
    it here cancels them, and the engines abort the request, at once.
    """

    async def stream_response(self, send: Any) -> None:
        try:
            await super().stream_response(send)
        finally:
            body = self.body_iterator
            if isinstance(body, AsyncGenerator):
                await body.aclose()


async def _sse(
    shape: _Shape,
    first: Delta,
    rest: AsyncGenerator[Delta, None],
    include_usage: bool,
    trace: RequestTrace,
) -> AsyncIterator[str]:
    def event(obj: dict[str, Any]) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def all_deltas() -> AsyncGenerator[Delta, None]:
        yield first
        async with contextlib.aclosing(rest):
            async for d in rest:
                yield d

    usage = None
    is_first = True
    deltas = all_deltas()
    try:
        async for delta in deltas:
            wants_ids = bool(delta.token_ids) and shape.prompt_token_ids is not None
            if delta.text or delta.finish_reason is not None or is_first or wants_ids:
                choice = shape.chunk_choice(delta, is_first)
                yield event(shape.envelope([choice], None, stream=True))
                is_first = False
            usage = delta.usage or usage
    except PdserveError as e:
        # Headers are gone; report the failure in-band, as OpenAI-compatible servers do.
        trace.fail(e)
        yield event(e.to_openai())
    else:
        if include_usage:
            yield event(shape.envelope([], _usage_json(usage), stream=True))
    finally:
        await deltas.aclose()  # closes ``rest``: the worker calls end with the stream
        trace.end()  # also when the client hangs up (the generator is closed)
    yield "data: [DONE]\n\n"
