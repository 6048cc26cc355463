"""Per-tenant prefix-cache isolation ("tenant salting").

A shared prefix cache leaks: a request whose prompt another tenant sent recently returns
its first token sooner, so one tenant can probe another's prompts by timing. With
isolation on, the router gives each tenant's requests a ``cache_salt`` (vLLM's prompt
field): the engines then share cached blocks only between requests of the same salt, and
the router salts its own block hashes the same way (router/kv_index/hashing.py) so
prefix-aware routing still finds the tenant's blocks.

Who is a tenant:
- with API keys (``--api-key``): the key the request authenticated with. The tenant
  header is ignored, so a client cannot join another tenant's cache.
- without API keys: the ``x-pdserve-tenant`` header (HTTP) / metadata (gRPC), which a
  gateway in front of the router must set and overwrite: an open API cannot authenticate
  its clients, so it cannot stop one from naming another's tenant.
- requests with neither share one unsalted cache.

Salts are a hash of the principal with a fixed domain prefix: equal across router
replicas and restarts (so the cache survives them), and never the key itself.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from pdserve.router.auth import bearer_token

TENANT_HEADER = "x-pdserve-tenant"
_DOMAIN = b"pdserve-cache-salt\x00"
# Hex digits of the salt (128 bits): unique per tenant, short on the wire.
SALT_CHARS = 32


class CacheSalter:
    """The prefix-cache salt of a request from its credentials; None: no isolation."""

    def __init__(self, enabled: bool, by_api_key: bool) -> None:
        self.enabled = enabled
        self.by_api_key = by_api_key

    @staticmethod
    def salt_of(principal: str) -> str:
        digest = hashlib.sha256(_DOMAIN + principal.encode("utf-8", "surrogatepass"))
        return digest.hexdigest()[:SALT_CHARS]

    def salt(self, authorization: str | None, tenant: str | None) -> str | None:
        """``authorization``: the request's Authorization header (already checked by
        router/auth.py when keys are on); ``tenant``: its tenant header."""
        if not self.enabled:
            return None
        if self.by_api_key:
            key = bearer_token(authorization)
            return None if key is None else self.salt_of("key:" + key)
        tenant = (tenant or "").strip()
        if not tenant:
            return None
        return self.salt_of("tenant:" + tenant)

    def salt_from_metadata(self, metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
        """The same, from gRPC invocation metadata."""
        if not self.enabled:
            return None
        found = {k: v for k, v in metadata if isinstance(v, str)}
        return self.salt(found.get("authorization"), found.get(TENANT_HEADER))
