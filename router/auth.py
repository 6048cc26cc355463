"""API keys for the router's client APIs (HTTP Bearer and gRPC ``authorization``
metadata, checked in router/grpc_guard.py), with an optional per-key token-bucket rate
limit.

Keys are compared in constant time against every configured key (no early exit), so
response timing does not reveal how much of a guess was right. Health, readiness,
metrics, gRPC health and reflection stay open: probes and scrapers carry no key.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from pdserve.config import AuthConfig
from pdserve.errors import OverloadedError, PdserveError, UnauthenticatedError
from pdserve.metrics import RouterMetrics


def bearer_token(header: str | None) -> str | None:
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


@dataclass
class _Bucket:
    tokens: float
    updated: float


class ApiKeys:
    def __init__(
        self,
        config: AuthConfig,
        metrics: RouterMetrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.clock = clock
        # Digests: every comparison is over equal-length values.
        self._digests = [hashlib.sha256(k.encode()).digest() for k in config.api_keys]
        self._buckets: dict[int, _Bucket] = {}

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def authenticate(self, presented: str | None) -> None:
        """Raise UnauthenticatedError for a missing/unknown key, OverloadedError when the
        key is over its rate limit."""
        if not self.enabled:
            return
        if presented is None:
            self.metrics.rejected.labels("unauthenticated").inc()
            raise UnauthenticatedError("missing API key: send 'Authorization: Bearer <key>'")
        digest = hashlib.sha256(presented.encode()).digest()
        match = -1
        for i, known in enumerate(self._digests):
            if hmac.compare_digest(digest, known):
                match = i
        if match < 0:
            self.metrics.rejected.labels("unauthenticated").inc()
            raise UnauthenticatedError("invalid API key")
        self._take(match)

    def _take(self, key: int) -> None:
        rate = self.config.rate_limit_rps
        if rate <= 0:
            return
        now = self.clock()
        burst = float(max(1, self.config.rate_limit_burst))
        bucket = self._buckets.setdefault(key, _Bucket(burst, now))
        bucket.tokens = min(burst, bucket.tokens + (now - bucket.updated) * rate)
        bucket.updated = now
        if bucket.tokens < 1:
            self.metrics.rejected.labels("rate_limit").inc()
            wait = max(1, int((1 - bucket.tokens) / rate + 0.999))
            raise OverloadedError(
                f"rate limit of {rate:g} requests/s for this API key exceeded",
                retry_after_s=wait,
            )
        bucket.tokens -= 1

    def http_middleware(
        self,
    ) -> Callable[[Request, Callable[[Request], Awaitable[Response]]], Awaitable[Response]]:
        async def middleware(
            request: Request, call_next: Callable[[Request], Awaitable[Response]]
        ) -> Response:
            if request.url.path.startswith("/v1/"):
                try:
                    self.authenticate(bearer_token(request.headers.get("authorization")))
                except PdserveError as e:
                    return JSONResponse(
                        e.to_openai(), status_code=e.http_status, headers=e.http_headers()
                    )
            return await call_next(request)

        return middleware
