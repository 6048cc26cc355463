"""The contract every source of workers (static list, Kubernetes, ...) implements."""

from __future__ import annotations

import abc

from pdserve.router.workers import WorkerPool


class Discovery(abc.ABC):
    """Keeps a WorkerPool's membership in step with a source of workers.

    ``run(pool)`` runs until it is cancelled. While it runs it:

    - adds a worker (``pool.add``) with the role the source gives, once the source says it
      is ready to take requests, and never adds the same address twice;
    - removes it (``pool.remove``) when it disappears from the source or stops being
      ready; a worker whose address changes leaves and joins again;
    - touches the pool only from the event loop that runs it, and never blocks that loop;
    - rides out failures of the source (retrying with backoff) and keeps the membership
      it has meanwhile: a source that is briefly unreachable must not empty the pool;
    - raises only for errors that retrying cannot fix (no credentials, bad configuration).

    Whether a worker is healthy is not discovery's business: the pool polls every member
    and only routes to those that answer and agree on their identity.
    """

    @abc.abstractmethod
    async def run(self, pool: WorkerPool) -> None:
        """Follow the source until cancelled (see the class docstring)."""
