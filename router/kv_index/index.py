"""Per-worker sets of cached block hashes, and prefix matching over them.

The same structure serves both modes: the exact index is fed by the engines' KV events
(``apply``); the approximate index records what the router routed (``record``) and
forgets each worker's least recently routed blocks beyond a capacity, since it cannot
see the engine's evictions. Workers are keyed by their address.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from pdserve.router.kv_index.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KvEvent,
    as_int_hash,
)

# Media whose blocks a request can reuse without a load (vLLM labels its device tier
# "GPU" on every platform, CPU included); offload tiers are ignored.
_CACHE_MEDIA = (None, "GPU")


class PrefixIndex:
    """Block hashes held by each worker, with a reverse map for matching.

    ``capacity_blocks``: keep at most this many blocks per worker, dropping the least
    recently stored or matched (approximate mode); None keeps everything (exact mode,
    where the engine's BlockRemoved events do the forgetting).
    """

    def __init__(self, capacity_blocks: int | None = None) -> None:
        self.capacity_blocks = capacity_blocks
        # Insertion-ordered: the first key is the least recently used block.
        self._blocks: dict[str, dict[int, None]] = {}
        self._holders: dict[int, set[str]] = {}

    # --- updates -------------------------------------------------------------------
    def store(self, worker: str, hashes: Iterable[int]) -> None:
        blocks = self._blocks.setdefault(worker, {})
        for h in hashes:
            if h in blocks:
                del blocks[h]  # re-insert as most recently used
            else:
                self._holders.setdefault(h, set()).add(worker)
            blocks[h] = None
        if self.capacity_blocks is not None:
            excess = len(blocks) - self.capacity_blocks
            if excess > 0:
                self.remove(worker, list(blocks)[:excess])

    def remove(self, worker: str, hashes: Iterable[int]) -> None:
        blocks = self._blocks.get(worker)
        if not blocks:
            return
        for h in hashes:
            if h in blocks:
                del blocks[h]
                holders = self._holders[h]
                holders.discard(worker)
                if not holders:
                    del self._holders[h]

    def clear(self, worker: str) -> None:
        """Forget everything ``worker`` holds (AllBlocksCleared, a gap, a restart)."""
        self.remove(worker, list(self._blocks.get(worker, ())))

    def drop_worker(self, worker: str) -> None:
        self.clear(worker)
        self._blocks.pop(worker, None)

    def apply(self, worker: str, events: Sequence[KvEvent]) -> None:
        for event in events:
            if isinstance(event, BlockStored):
                if event.medium in _CACHE_MEDIA and not event.group_idx:
                    self.store(worker, (as_int_hash(h) for h in event.block_hashes))
            elif isinstance(event, BlockRemoved):
                if event.medium in _CACHE_MEDIA and not event.group_idx:
                    self.remove(worker, (as_int_hash(h) for h in event.block_hashes))
            elif isinstance(event, AllBlocksCleared):
                self.clear(worker)

    def record(self, worker: str, hashes: Sequence[int]) -> None:
        """Approximate mode: ``worker`` was sent a prompt with these blocks."""
        self.store(worker, hashes)

    # --- queries -------------------------------------------------------------------
    def match(self, hashes: Sequence[int]) -> dict[str, int]:
        """Per worker, how many leading blocks of ``hashes`` it holds (absent: none).

        Cost grows with the matched depth times the holders per block, not with the
        number of workers in the index.
        """
        matched: dict[str, int] = {}
        alive: set[str] | None = None
        for depth, h in enumerate(hashes, start=1):
            holders = self._holders.get(h)
            if not holders:
                break
            alive = set(holders) if alive is None else alive & holders
            if not alive:
                break
            for worker in alive:
                matched[worker] = depth
        return matched

    def holds(self, worker: str, block_hash: int) -> bool:
        return block_hash in self._blocks.get(worker, ())

    def blocks_of(self, worker: str) -> int:
        return len(self._blocks.get(worker, ()))

    @property
    def workers(self) -> list[str]:
        return list(self._blocks)

    @property
    def size(self) -> int:
        """Distinct block hashes held by any worker."""
        return len(self._holders)
