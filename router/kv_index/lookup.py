"""Per request: how many prompt tokens each worker already holds, by either index mode."""

from __future__ import annotations

import abc
from collections.abc import Sequence

from pdserve.router.kv_index.hashing import BlockHasher
from pdserve.router.kv_index.index import PrefixIndex

# Approximate mode: the router hashes prompts into blocks of this many tokens and keeps
# up to this many blocks per worker (a guess at the engine's cache size, in blocks).
APPROXIMATE_BLOCK_SIZE = 16
APPROXIMATE_CAPACITY_BLOCKS = 4096


class PromptBlocks:
    """A prompt's block hashes, computed once per hasher and shared by every plugin;
    salted with the request's tenant salt, as the engines salt their cache."""

    def __init__(self, token_ids: Sequence[int], cache_salt: str | None = None) -> None:
        self.token_ids = token_ids
        self.cache_salt = cache_salt
        self._hashes: dict[tuple[int, str], list[int]] = {}

    def hashes(self, hasher: BlockHasher) -> list[int]:
        key = (hasher.block_size, hasher.algorithm)
        found = self._hashes.get(key)
        if found is None:
            found = self._hashes[key] = hasher.block_hashes(self.token_ids, self.cache_salt)
        return found


class PrefixLookup(abc.ABC):
    """Which workers hold a prefix of the prompt, and how many tokens of it."""

    mode: str

    def __init__(self, index: PrefixIndex) -> None:
        self.index = index

    @property
    @abc.abstractmethod
    def hasher(self) -> BlockHasher | None:
        """How prompts are cut into blocks (None: not known yet)."""

    def matched_tokens(self, prompt: PromptBlocks) -> dict[str, int]:
        """Worker key -> cached leading prompt tokens (absent: none)."""
        hasher = self.hasher
        if hasher is None:
            return {}
        matched = self.index.match(prompt.hashes(hasher))
        return {w: n * hasher.block_size for w, n in matched.items()}

    def observe(self, worker: str, prompt: PromptBlocks) -> None:
        """The router sent ``prompt`` to ``worker`` (the exact index ignores it)."""
        return None


class EventPrefixLookup(PrefixLookup):
    """Exact: the index is fed by the engines' KV events (router/kv_index/subscriber.py)."""

    mode = "events"

    def __init__(self, index: PrefixIndex) -> None:
        super().__init__(index)
        self._hasher: BlockHasher | None = None

    @property
    def hasher(self) -> BlockHasher | None:
        return self._hasher

    def use_hasher(self, hasher: BlockHasher) -> None:
        """Set from the workers' KV layout (block size, hash algorithm) when they join."""
        self._hasher = hasher


class RoutedPrefixLookup(PrefixLookup):
    """Approximate, for engines without events: what the router itself routed."""

    mode = "approximate"

    def __init__(
        self,
        block_size: int = APPROXIMATE_BLOCK_SIZE,
        capacity_blocks: int = APPROXIMATE_CAPACITY_BLOCKS,
    ) -> None:
        super().__init__(PrefixIndex(capacity_blocks))
        self._hasher = BlockHasher(block_size, "sha256_cbor")

    @property
    def hasher(self) -> BlockHasher:
        return self._hasher

    def observe(self, worker: str, prompt: PromptBlocks) -> None:
        self.index.record(worker, prompt.hashes(self._hasher))
