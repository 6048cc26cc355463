"""The router's gRPC server interceptors: API keys (router/auth.py) and malformed input.

grpcio answers a request it cannot parse with UNKNOWN (a server-side fault). A hostile or
broken client must get INVALID_ARGUMENT instead: the request deserializer is wrapped so
that a parse error becomes a value the wrapped method turns into a clear refusal.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from pdserve.errors import PdserveError
from pdserve.router.auth import ApiKeys, bearer_token

# gRPC services that need no key: health checks (Kubernetes probes) and reflection.
OPEN_GRPC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

UnaryBehaviour = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
StreamBehaviour = Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]


class _HandlerInterceptor(grpc.aio.ServerInterceptor, abc.ABC):
    """Hands every method the server has a handler for to ``wrap``, which returns the
    handler to use instead (or the same one)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return self.wrap(handler, handler_call_details)

    @abc.abstractmethod
    def wrap(
        self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler: ...


def _handler_like(
    handler: grpc.RpcMethodHandler,
    unary: UnaryBehaviour,
    stream: StreamBehaviour,
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s kind and serializers that runs ``unary`` (a method with
    one response) or ``stream`` (a streaming response) instead; ``request_deserializer``
    replaces the handler's own."""
    kwargs = {
        "request_deserializer": request_deserializer or handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(stream, **kwargs)
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary, **kwargs)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary, **kwargs)
    return grpc.stream_stream_rpc_method_handler(stream, **kwargs)


class GrpcAuthInterceptor(_HandlerInterceptor):
    """Checks ``authorization: Bearer <key>`` metadata on every non-open method."""

    def __init__(self, keys: ApiKeys) -> None:
        self.keys = keys

    def wrap(
        self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        if (details.method or "").startswith(OPEN_GRPC_PREFIXES):
            return handler
        metadata = dict(details.invocation_metadata or ())
        header = metadata.get("authorization")
        try:
            self.keys.authenticate(bearer_token(header if isinstance(header, str) else None))
        except PdserveError as e:
            return _refusal(handler, e)
        return handler


def _refusal(handler: grpc.RpcMethodHandler, error: PdserveError) -> grpc.RpcMethodHandler:
    async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(error.grpc_code, error.message)

    async def deny_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(error.grpc_code, error.message)
        yield  # pragma: no cover - makes this an async generator

    return _handler_like(handler, deny, deny_stream)


@dataclass(frozen=True)
class _Malformed:
    reason: str


class RejectMalformed(_HandlerInterceptor):
    def wrap(
        self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        if handler.request_streaming or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer

        def safe_parse(data: bytes) -> Any:
            try:
                return parse(data)
            except DecodeError as e:
                return _Malformed(str(e))

        async def refuse(request: _Malformed, context: grpc.aio.ServicerContext) -> None:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"malformed request message: {request.reason}"
            )

        async def unary_stream(
            request: Any, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            if isinstance(request, _Malformed):
                await refuse(request, context)
                return
            async for response in handler.unary_stream(request, context):
                yield response

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Malformed):
                await refuse(request, context)
            return await handler.unary_unary(request, context)

        return _handler_like(handler, unary_unary, unary_stream, request_deserializer=safe_parse)


def router_interceptors(keys: ApiKeys) -> list[grpc.aio.ServerInterceptor]:
    guards: list[grpc.aio.ServerInterceptor] = [RejectMalformed()]
    if keys.enabled:
        guards.insert(0, GrpcAuthInterceptor(keys))
    return guards
