"""Typed errors, mapped once to HTTP status, gRPC status code and OpenAI error type."""

from __future__ import annotations

from typing import ClassVar

import grpc

# Trailing-metadata key a worker puts on the errors it reports itself (its verdict on a
# request, e.g. a failed KV pull), so the router can tell them from transport failures
# of a dead worker, which carry the same status code (UNAVAILABLE).
WORKER_VERDICT_KEY = "pdserve-error"


class PdserveError(Exception):
    """Base of every error pdserve reports to a caller."""

    http_status: ClassVar[int] = 500
    grpc_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL
    openai_type: ClassVar[str] = "internal_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def http_headers(self) -> dict[str, str]:
        """Extra HTTP response headers for this error (e.g. Retry-After)."""
        return {}

    def to_openai(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.openai_type,
                "param": self.param,
                "code": self.http_status,
            }
        }


class ConfigError(PdserveError):
    """A configuration or command-line value that cannot work."""


class InvalidRequestError(PdserveError):
    http_status = 400
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    openai_type = "invalid_request_error"


class ContextLengthError(InvalidRequestError):
    """Prompt plus max_tokens does not fit the model's context."""


class ModelNotFoundError(PdserveError):
    http_status = 404
    grpc_code = grpc.StatusCode.NOT_FOUND
    openai_type = "not_found_error"


class NoCapacityError(PdserveError):
    """No healthy worker can take the request right now."""

    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE
    openai_type = "service_unavailable"


class OverloadedError(PdserveError):
    """The router is at its admission limits; the client should retry after a pause."""

    http_status = 429
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    openai_type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def http_headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class UnauthenticatedError(PdserveError):
    """No API key, or not one of the configured keys."""

    http_status = 401
    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    openai_type = "authentication_error"

    def http_headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class WorkerDrainingError(NoCapacityError):
    """The worker is shutting down and takes no new requests (others may)."""

    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class WorkerError(PdserveError):
    """A worker failed while serving the request."""

    http_status = 502
    grpc_code = grpc.StatusCode.UNAVAILABLE
    openai_type = "upstream_error"


class KvIncompatibleError(PdserveError):
    """Prefill and decode disagree on the KV layout; moving bytes would yield garbage."""

    http_status = 500
    grpc_code = grpc.StatusCode.FAILED_PRECONDITION
    openai_type = "kv_incompatible"


class KvTransferError(PdserveError):
    """The KV cache could not be moved from the prefill to the decode worker."""

    http_status = 502
    grpc_code = grpc.StatusCode.UNAVAILABLE
    openai_type = "kv_transfer_error"


class KvIntegrityError(KvTransferError):
    """KV bytes arrived corrupted (a chunk failed its checksum); none of them were used."""


class ScalingError(PdserveError):
    """A scaling backend (launcher, Kubernetes, Ray) refused or failed to resize a pool."""


_BY_GRPC_CODE: dict[grpc.StatusCode, type[PdserveError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.NOT_FOUND: ModelNotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: KvIncompatibleError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: NoCapacityError,
}


def from_grpc_error(code: grpc.StatusCode, details: str) -> PdserveError:
    """Rebuild the typed error a worker raised from its gRPC status."""
    return _BY_GRPC_CODE.get(code, WorkerError)(details or f"worker error: {code.name}")
