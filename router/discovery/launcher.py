"""Discovery from the `pdserve up` launcher's control endpoint (deploy/local/control.py).

Every ``interval_s`` the router posts what it has applied and how many of its requests
run on each worker it knows, and gets the launcher's membership back. That report is
the router-side half of a drain: a worker the launcher scales away leaves the pool at
once (no new requests), and the launcher stops it only after the router has applied
that membership and reports none of its requests still running there.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from pdserve.config import Role
from pdserve.router.backoff import Backoff
from pdserve.router.discovery.base import Discovery
from pdserve.router.workers import WorkerClient, WorkerPool

log = logging.getLogger(__name__)
SYNC_PATH = "/v1/discovery/sync"


class LauncherDiscovery(Discovery):
    def __init__(
        self,
        url: str,
        interval_s: float = 0.5,
        retry_max_s: float = 10.0,
        request_timeout_s: float = 5.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.interval_s = interval_s
        self.retry_max_s = retry_max_s
        self.request_timeout_s = request_timeout_s

    async def run(self, pool: WorkerPool) -> None:
        # httpx logs every request at INFO: two lines a second in the router's log.
        logging.getLogger("httpx").setLevel(max(logging.WARNING, log.getEffectiveLevel()))
        async with httpx.AsyncClient(timeout=self.request_timeout_s) as http:

            async def exchange(applied: int, in_flight: dict[str, int]) -> Any:
                reply = await http.post(
                    self.url + SYNC_PATH, json={"applied": applied, "in_flight": in_flight}
                )
                reply.raise_for_status()
                return reply.json()

            # A launcher briefly unreachable must not empty the pool: keep the members.
            await follow_membership(
                pool,
                exchange,
                Backoff(self.interval_s, self.retry_max_s),
                self.interval_s,
                (httpx.HTTPError,),
                f"launcher {self.url}",
            )


# What a membership document that does not parse raises.
_BAD_DOCUMENT = (ValueError, KeyError, TypeError, AttributeError)


async def follow_membership(
    pool: WorkerPool,
    exchange: Callable[[int, dict[str, int]], Awaitable[Any]],
    backoff: Backoff,
    interval_s: float,
    errors: tuple[type[BaseException], ...],
    source: str,
    on_error: Callable[[], None] = lambda: None,
) -> None:
    """Every ``interval_s``: report the applied membership version and this router's
    requests in flight per worker through ``exchange``, and make the pool's members the
    ones it returns. On ``errors`` (or a document that does not parse) the members stay
    as they are, ``on_error`` runs, and the next try waits a backoff."""
    caught: tuple[type[BaseException], ...] = (*errors, *_BAD_DOCUMENT)
    applied = 0
    # Workers removed from the pool whose requests still run: reported until done.
    leaving: list[WorkerClient] = []
    while True:
        leaving = [w for w in leaving if w.in_flight > 0]
        in_flight = {w.address: w.in_flight for w in [*pool.workers, *leaving]}
        try:
            doc = await exchange(applied, in_flight)
            version = int(doc["version"])
            wanted = {
                (Role(role), str(address))
                for role, addresses in doc["members"].items()
                for address in addresses
            }
        except caught as e:
            on_error()
            wait = backoff.failed()
            log.warning("%s: %r; retrying in %.1f s", source, e, wait)
            await asyncio.sleep(wait)
            continue
        leaving += _apply(pool, wanted)
        applied = version
        backoff.reset()
        await asyncio.sleep(interval_s)


def _apply(pool: WorkerPool, wanted: set[tuple[Role, str]]) -> list[WorkerClient]:
    """Make the pool's members ``wanted``; returns the clients that left."""
    current = {(w.role, w.address): w for w in pool.workers}
    left = []
    for key, worker in current.items():
        if key not in wanted:
            pool.remove(worker.address, worker.role)
            left.append(worker)
            log.info("%s worker %s left the pool (scaled down)", worker.role, worker.address)
    for role, address in sorted(wanted - set(current)):
        pool.add([address], role)
        log.info("%s worker %s joined the pool", role, address)
    return left
