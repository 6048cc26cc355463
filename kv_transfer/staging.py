"""The producer's staging area: copies of finished prompts' KV, held under a lease.

An engine rank copies a request's blocks out of its paged KV cache into a ``StagedKv``
(so the engine frees its blocks at once) and keeps it until every (layer, KV head) cell
has been confirmed by a consumer, or the lease runs out. Thread-safe: the engine thread
stages, gRPC threads read and confirm, a reaper expires.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from pdserve.kv_transfer.shm import SharedBuffer


@dataclass
class StagedKv:
    """One request's KV on one producer rank.

    ``layers`` maps a global layer index to a tensor of shape
    [num_blocks, head_count, block_size, entry_elems] (heads ``head_start`` onwards).
    """

    request_id: str
    layers: dict[int, torch.Tensor]
    head_start: int
    head_count: int
    deadline: float  # time.monotonic() value
    confirmed: set[tuple[int, int]] = field(default_factory=set)
    # The /dev/shm file the layers live in (kv_transfer/shm.py), None: private memory.
    buffer: SharedBuffer | None = None

    @property
    def num_blocks(self) -> int:
        return next(iter(self.layers.values())).shape[0] if self.layers else 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.layers.values())

    def cells(self) -> set[tuple[int, int]]:
        heads = range(self.head_start, self.head_start + self.head_count)
        return {(layer, head) for layer in self.layers for head in heads}


class Staging:
    """Staged KV by request id, with lease expiry and confirmation bookkeeping."""

    def __init__(
        self,
        lease_s: float,
        clock: Callable[[], float] = time.monotonic,
        on_expire: Callable[[StagedKv], None] | None = None,
    ) -> None:
        self.lease_s = lease_s
        self._clock = clock
        self._on_expire = on_expire
        self._lock = threading.Lock()
        self._entries: dict[str, StagedKv] = {}

    def put(
        self,
        request_id: str,
        layers: dict[int, torch.Tensor],
        head_start: int,
        head_count: int,
        buffer: SharedBuffer | None = None,
    ) -> StagedKv:
        """Stage ``layers`` (owned from now on; ``buffer``, when given, is unlinked with
        the entry). A request staged again replaces its earlier copy."""
        deadline = self._clock() + self.lease_s
        entry = StagedKv(request_id, layers, head_start, head_count, deadline, buffer=buffer)
        with self._lock:
            old = self._entries.pop(request_id, None)
            self._entries[request_id] = entry
        _free(old)
        return entry

    def get(self, request_id: str) -> StagedKv | None:
        """The live entry, or None when absent or past its lease."""
        with self._lock:
            entry = self._entries.get(request_id)
            if entry is not None and entry.deadline <= self._clock():
                return None
            return entry

    def confirm(
        self, request_id: str, layers: Iterable[int], head_start: int, head_count: int
    ) -> tuple[bool, bool]:
        """Mark cells as delivered. Returns (found, freed)."""
        with self._lock:
            entry = self._entries.get(request_id)
            if entry is None:
                return False, False
            if head_count == 0:
                head_start, head_count = entry.head_start, entry.head_count
            wanted = set(layers) or set(entry.layers)
            heads = range(head_start, head_start + head_count)
            entry.confirmed |= {c for c in entry.cells() if c[0] in wanted and c[1] in heads}
            if not entry.confirmed >= entry.cells():
                return True, False
            del self._entries[request_id]
        _free(entry)
        return True, True

    def drop(self, request_id: str) -> bool:
        with self._lock:
            entry = self._entries.pop(request_id, None)
        _free(entry)
        return entry is not None

    def clear(self) -> None:
        """Free everything (the server is stopping)."""
        with self._lock:
            entries, self._entries = list(self._entries.values()), {}
        for entry in entries:
            _free(entry)

    def expire(self) -> list[StagedKv]:
        """Remove entries past their lease; returns them (already removed)."""
        now = self._clock()
        with self._lock:
            gone = [e for e in self._entries.values() if e.deadline <= now]
            for entry in gone:
                del self._entries[entry.request_id]
        for entry in gone:
            _free(entry)
        if self._on_expire is not None:
            for entry in gone:
                self._on_expire(entry)
        return gone

    def totals(self) -> tuple[int, int, int]:
        """(requests, blocks, bytes) staged now."""
        with self._lock:
            entries = list(self._entries.values())
        return (
            len(entries),
            sum(e.num_blocks for e in entries),
            sum(e.nbytes for e in entries),
        )


def _free(entry: StagedKv | None) -> None:
    if entry is not None and entry.buffer is not None:
        entry.buffer.release()
