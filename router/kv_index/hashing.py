"""Prompt block hashes computed exactly as vLLM's prefix cache computes them.

vLLM hashes each full block of ``block_size`` tokens as
``H((parent_hash, tuple(block_token_ids), extra_keys))``, chained from ``NONE_HASH =
H(seed)``, and publishes the low 64 bits (big-endian) of each hash in its KV events
(``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``, on by default). ``sha256_cbor`` (CBOR, canonical)
is reproducible in any process; workers run with it so the router can compute the same
values from token ids. Text-only prompts without LoRA or cache salt have ``extra_keys``
None; a request's ``cache_salt`` (per-tenant isolation, router/tenancy.py) enters the
first block only, as ``(("cache_salt", salt),)``, and reaches the rest through the chain.
The seed is ``PYTHONHASHSEED`` when set, else vLLM's fixed default: router and
workers must agree on it (the index checks first blocks against the engines' events).
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Callable, Sequence
from typing import Any

import cbor2

from pdserve.errors import ConfigError

# vLLM's fixed seed for cryptographic hash algorithms (kv_cache_utils.DEFAULT_NONE_HASH_SEED).
VLLM_NONE_HASH_SEED = "vllm-none-hash"
# The hash-algorithm ids workers report in their KV layout ("vllm-" + vLLM's name).
ALGORITHM_PREFIX = "vllm-"
# Blocks remembered per hasher: shared prefixes (system prompts) are hashed once, not per
# request (a dict lookup costs a fraction of CBOR + SHA-256).
CACHED_BLOCKS = 65536


def _sha256_cbor(obj: Any) -> bytes:
    return hashlib.sha256(cbor2.dumps(obj, canonical=True)).digest()


def _sha256_pickle(obj: Any) -> bytes:
    return hashlib.sha256(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).digest()


_HASH_FUNCTIONS: dict[str, Callable[[Any], bytes]] = {
    "sha256_cbor": _sha256_cbor,
    "sha256": _sha256_pickle,
}


def external_hash(digest: bytes) -> int:
    """The 64-bit value vLLM publishes for a block hash."""
    return int.from_bytes(digest, "big") & ((1 << 64) - 1)


class BlockHasher:
    """Chained block hashes of a token sequence, as ints equal to vLLM's event hashes."""

    def __init__(self, block_size: int, algorithm: str, seed: str | None = None) -> None:
        name = algorithm.removeprefix(ALGORITHM_PREFIX)
        try:
            self._fn = _HASH_FUNCTIONS[name]
        except KeyError:
            raise ConfigError(
                f"block hash algorithm {algorithm!r} cannot be reproduced by the router; "
                f"run workers with one of {sorted(_HASH_FUNCTIONS)}"
            ) from None
        if block_size < 1:
            raise ConfigError(f"block size must be positive, got {block_size}")
        self.block_size = block_size
        self.algorithm = name
        if seed is None:
            seed = os.environ.get("PYTHONHASHSEED", VLLM_NONE_HASH_SEED)
        self._none_hash = self._fn(seed)
        # (parent digest, block tokens, extra keys) -> (digest, published 64-bit hash)
        self._cache: dict[tuple[bytes, tuple[int, ...], Any], tuple[bytes, int]] = {}

    def block_hashes(self, token_ids: Sequence[int], cache_salt: str | None = None) -> list[int]:
        """The published hash of every full block (a partial last block is not cached).
        ``cache_salt``: the request's salt (vLLM's ``cache_salt`` prompt field); prompts
        with different salts share no block hash."""
        parent = self._none_hash
        out: list[int] = []
        bs = self.block_size
        cache = self._cache
        extra: Any = (("cache_salt", cache_salt),) if cache_salt else None
        for start in range(0, len(token_ids) - bs + 1, bs):
            block = tuple(token_ids[start : start + bs])
            key = (parent, block, extra)
            found = cache.get(key)
            if found is None:
                digest = self._fn(key)
                found = (digest, external_hash(digest))
                if len(cache) >= CACHED_BLOCKS:
                    cache.clear()
                cache[key] = found
            parent = found[0]
            out.append(found[1])
            extra = None  # vLLM salts the first block only
        return out

    def first_block_hash(self, token_ids: Sequence[int]) -> int:
        """The hash of a parentless block with these tokens (checks against engine events)."""
        return external_hash(self._fn((self._none_hash, tuple(token_ids), None)))
