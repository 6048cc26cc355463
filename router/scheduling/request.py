"""What scheduling plugins know about one request, computed at most once per request."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pdserve.config import Role
from pdserve.router.kv_index.lookup import PrefixLookup, PromptBlocks
from pdserve.router.workers import WorkerClient


@dataclass
class SchedulingRequest:
    """``roles``: which workers may take this pick; ``peer``: the worker already chosen
    for the other stage (the KV-compatibility filter checks against it)."""

    prompt_token_ids: Sequence[int]
    session_key: str | None = None
    roles: tuple[Role, ...] = (Role.DECODE,)
    peer: WorkerClient | None = None
    # The tenant's prefix-cache salt (router/tenancy.py); None: the shared cache.
    cache_salt: str | None = None
    blocks: PromptBlocks = field(init=False)
    _matches: dict[int, dict[str, int]] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.blocks = PromptBlocks(self.prompt_token_ids, self.cache_salt)

    def for_stage(self, roles: tuple[Role, ...], peer: WorkerClient | None) -> SchedulingRequest:
        """The same request (and its cached hashes) for a pick in another pool."""
        other = SchedulingRequest(
            self.prompt_token_ids, self.session_key, roles, peer, self.cache_salt
        )
        other.blocks = self.blocks
        other._matches = self._matches
        return other

    def matched_tokens(self, lookup: PrefixLookup) -> dict[str, int]:
        """Worker address -> leading prompt tokens it holds, per ``lookup``."""
        found = self._matches.get(id(lookup))
        if found is None:
            found = self._matches[id(lookup)] = lookup.matched_tokens(self.blocks)
        return found

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)
