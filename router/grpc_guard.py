"""The router's gRPC server interceptors: API keys (router/auth.py) and malformed input.

grpcio answers a request it cannot parse with UNKNOWN (a server-side fault). A hostile or
broken client must get INVALID_ARGUMENT instead: the request deserializer is wrapped so
that a parse error becomes a value the wrapped method turns into a clear refusal.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from pdserve.router.auth import ApiKeys, GrpcAuthInterceptor


@dataclass(frozen=True)
class _Malformed:
    reason: str


class RejectMalformed(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
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

        kwargs = {
            "request_deserializer": safe_parse,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_stream is not None:
            method = handler.unary_stream

            async def unary_stream(
                request: Any, context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                if isinstance(request, _Malformed):
                    await refuse(request, context)
                    return
                async for response in method(request, context):
                    yield response

            return grpc.unary_stream_rpc_method_handler(unary_stream, **kwargs)
        unary = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Malformed):
                await refuse(request, context)
            return await unary(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, **kwargs)


def router_interceptors(keys: ApiKeys) -> list[grpc.aio.ServerInterceptor]:
    guards: list[grpc.aio.ServerInterceptor] = [RejectMalformed()]
    if keys.enabled:
        guards.insert(0, GrpcAuthInterceptor(keys))
    return guards
