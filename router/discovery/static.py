"""Discovery from a fixed list of addresses (command-line flags, `pdserve up`)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

from pdserve.config import Role
from pdserve.router.discovery.base import Discovery
from pdserve.router.workers import WorkerPool


class StaticDiscovery(Discovery):
    """Every listed worker joins at once and stays; the pool's polls decide which of them
    are healthy."""

    def __init__(self, workers: Mapping[Role, Sequence[str]]) -> None:
        self.workers = {role: tuple(dict.fromkeys(addrs)) for role, addrs in workers.items()}

    async def run(self, pool: WorkerPool) -> None:
        for role, addresses in self.workers.items():
            pool.add(addresses, role)
        # The list never changes: wait to be cancelled.
        await asyncio.Event().wait()
