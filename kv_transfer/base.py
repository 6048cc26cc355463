"""The KV transport contract.

A transport decides how a prefill engine keeps a request's KV for a remote decode, what
the handle that names that KV looks like, and how a decode engine obtains it. The worker
process talks to its vLLM engine through ``kv_transfer_params`` (vLLM's connector API);
the transport translates between those parameters and pdserve's versioned ``KvHandle``.

Ownership and lifetime: after a prefill finishes, the producer engine owns the KV blocks
until the consumer has read them, the request is aborted, or the lease
(``lease_s``, counted from the end of the prefill) runs out, whichever comes first. The
consumer never frees producer blocks directly. A consumer may still be waiting for the KV
up to ``CONSUMER_GRACE_S`` past the lease (then it gives up); a producer that cannot
refuse a late read itself (NIXL: the consumer reads its memory directly) keeps the
blocks ``PRODUCER_HOLD_MARGIN_S`` beyond that, so a read never sees reused blocks.

Errors: a handle whose layout the consumer cannot use raises ``KvIncompatibleError``
before any byte moves; a transfer that fails raises ``KvTransferError`` (the engine is
configured to fail the request, not to recompute silently).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pdserve.config import Role
from pdserve.kv_transfer.metadata import KV_HANDLE_FORMAT_VERSION, KvLayout

# How long past its lease a decode request may still wait for its KV: the producer may
# free the blocks once the lease ends, so waiting much longer only hides a hang.
CONSUMER_GRACE_S = 10.0
# How much longer than the consumer's wait a producer keeps blocks a consumer reads
# directly (one-sided reads cannot be refused once the lease is over).
PRODUCER_HOLD_MARGIN_S = 5.0


@dataclass(frozen=True)
class KvHandle:
    """Names the KV of one prefilled request on its producer."""

    transport: str
    layout: KvLayout
    engine_id: str
    block_ids: tuple[int, ...]
    host: str
    port: int
    remote_request_id: str
    lease_deadline_unix_ms: int
    num_prompt_tokens: int
    # Connector parameters not modelled as fields, JSON-encoded values.
    extra: dict[str, str] = field(default_factory=dict)
    format_version: int = KV_HANDLE_FORMAT_VERSION


class KvTransport(abc.ABC):
    """One way of moving KV from prefill to decode. Stateless; one instance per worker."""

    name: ClassVar[str]

    def __init__(self, lease_s: float) -> None:
        self.lease_s = lease_s

    @abc.abstractmethod
    def engine_kv_config(self, role: Role, worker_id: str) -> dict[str, Any]:
        """Keyword arguments for vLLM's ``KVTransferConfig`` of an engine in ``role``."""

    @abc.abstractmethod
    def prefill_request_params(self) -> dict[str, Any]:
        """``kv_transfer_params`` for a prefill-only request (keep KV for a remote decode)."""

    @abc.abstractmethod
    def handle_from_prefill(
        self, params: dict[str, Any], layout: KvLayout, num_prompt_tokens: int, now_ms: int
    ) -> KvHandle:
        """Build the handle from the ``kv_transfer_params`` a finished prefill returned."""

    @abc.abstractmethod
    def decode_request_params(self, handle: KvHandle) -> dict[str, Any]:
        """``kv_transfer_params`` that make a decode engine obtain the handle's KV."""

    @abc.abstractmethod
    def check_shapes(self, producer: KvLayout, consumer: KvLayout) -> None:
        """Raise ``KvIncompatibleError`` for parallel shapes this transport cannot map."""
