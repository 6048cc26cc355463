"""Discovery from the Kubernetes API: follow the worker pods of each pool.

Per role: list the pods that match the pool's label selector, make the pool agree with
the ready ones, then watch from the list's resourceVersion. A watch the API server ends
(its timeout) resumes from the last version seen; one whose version has expired (410
Gone) lists again and reconciles, so workers that stayed keep their connection and state;
any other failure is retried with exponential backoff, and the members stay meanwhile.

The official client is synchronous. Its calls run in daemon threads that hand results to
the event loop, which alone touches the pool. Not asyncio.to_thread: a watch blocks for
minutes, and the loop's default executor would hold up the router's exit until it ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

# The ignore keeps mypy quiet where the client is not installed (it is only needed in
# kubernetes mode, and this module is imported only then).
from kubernetes import (  # type: ignore[import-not-found, unused-ignore]
    client,
    watch,
)

from pdserve.config import DiscoveryConfig, Role
from pdserve.errors import ConfigError
from pdserve.k8s import load_api_client
from pdserve.router.backoff import Backoff
from pdserve.router.discovery.base import Discovery
from pdserve.router.workers import WorkerPool

log = logging.getLogger(__name__)
T = TypeVar("T")
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
HTTP_GONE = 410
Event = dict[str, Any]


def pod_address(pod: Any, port: int) -> str | None:
    """``ip:port`` of a pod that should take requests (Ready, has an IP, not being
    deleted), else None."""
    meta, status = pod.metadata, pod.status
    if meta is None or status is None or meta.deletion_timestamp is not None:
        return None
    ip = status.pod_ip
    if not ip or not any(c.type == "Ready" and c.status == "True" for c in status.conditions or ()):
        return None
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


@dataclass
class _Members:
    """The workers of one role that this discovery put into the pool, by pod name."""

    role: Role
    pool: WorkerPool
    addresses: dict[str, str] = field(default_factory=dict)

    def set(self, pod: str, address: str | None) -> None:
        """Make ``pod`` a member at ``address``, or no member when ``address`` is None."""
        current = self.addresses.get(pod)
        if current == address:
            return
        if current is not None:
            del self.addresses[pod]
            self.pool.remove(current, self.role)
            log.info("%s pod %s left the pool (%s)", self.role, pod, current)
        if address is not None:
            self.addresses[pod] = address
            self.pool.add([address], self.role)
            log.info("%s pod %s joined the pool at %s", self.role, pod, address)

    def reconcile(self, wanted: dict[str, str]) -> None:
        for pod in [p for p in self.addresses if p not in wanted]:
            self.set(pod, None)
        for pod, address in wanted.items():
            self.set(pod, address)


class KubernetesDiscovery(Discovery):
    """Workers are the ready pods matching each pool's label selector in one namespace.

    ``api`` and ``watch_factory`` default to the real client (in-cluster credentials,
    else ~/.kube/config); tests pass fakes.
    """

    def __init__(
        self,
        config: DiscoveryConfig,
        api: Any | None = None,
        watch_factory: Callable[[], Any] = watch.Watch,
        retry_initial_s: float = 0.5,
        retry_max_s: float = 30.0,
        watch_timeout_s: int = 300,
        request_timeout_s: float = 30.0,
    ) -> None:
        if not config.selectors:
            raise ConfigError("kubernetes discovery needs a label selector per pool")
        self.config = config
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        # The API server ends each watch after this; the next one resumes where it left.
        self.watch_timeout_s = watch_timeout_s
        self.request_timeout_s = request_timeout_s
        self._api = api
        self._watch_factory = watch_factory

    async def run(self, pool: WorkerPool) -> None:
        api = self._api if self._api is not None else await _in_thread(_load_core_api)
        namespace = self.config.namespace or _own_namespace()
        log.info(
            "watching worker pods in namespace %s: %s",
            namespace,
            ", ".join(f"{r}={s!r}" for r, s in self.config.selectors.items()),
        )
        async with asyncio.TaskGroup() as group:
            for role, selector in self.config.selectors.items():
                group.create_task(self._follow(api, namespace, selector, _Members(role, pool)))

    async def _follow(self, api: Any, namespace: str, selector: str, members: _Members) -> None:
        """List, then watch, one pool's pods until cancelled."""
        loop = asyncio.get_running_loop()
        version: str | None = None
        backoff = Backoff(self.retry_initial_s, self.retry_max_s)
        while True:
            listed = version is None
            try:
                if version is None:
                    version = await self._relist(api, namespace, selector, members)
                    backoff.reset()
                started = loop.time()
                events = self._watch(api, namespace, selector, version)
                async with contextlib.aclosing(events):
                    async for event in events:
                        version = self._apply(event, members) or version
                        listed = False
                        backoff.reset()
                if loop.time() - started >= self.retry_initial_s:
                    backoff.reset()
                    continue  # the server's watch timeout: resume from `version`
                problem = "the watch ended at once"
            except client.ApiException as e:
                problem = f"API error {e.status} {e.reason}"
                if e.status == HTTP_GONE:
                    version = None  # list again
                    if not listed:  # (right after a list: back off rather than spin)
                        log.info("%s: the watch expired; listing again", selector)
                        continue
            except Exception as e:
                problem = repr(e)
            wait = backoff.failed()
            log.warning("%s: %s; retrying in %.1f s", selector, problem, wait)
            await asyncio.sleep(wait)

    async def _relist(self, api: Any, namespace: str, selector: str, members: _Members) -> str:
        """Make the members agree with a fresh list; returns the list's resourceVersion."""
        pods = await _in_thread(
            lambda: api.list_namespaced_pod(
                namespace, label_selector=selector, _request_timeout=self.request_timeout_s
            )
        )
        wanted = {}
        for pod in pods.items:
            address = pod_address(pod, self.config.worker_port)
            if address is not None:
                wanted[pod.metadata.name] = address
        members.reconcile(wanted)
        version = pods.metadata.resource_version if pods.metadata else None
        if not version:
            raise RuntimeError("the pod list has no resourceVersion")
        return str(version)

    def _apply(self, event: Event, members: _Members) -> str | None:
        """Apply one watch event; returns the resourceVersion it carries."""
        kind = event["type"]
        if kind == "BOOKMARK":  # only a newer version to resume from
            version = event["raw_object"].get("metadata", {}).get("resourceVersion")
            return str(version) if version else None
        pod = event["object"]
        if getattr(pod, "metadata", None) is None or not pod.metadata.name:
            log.warning("ignoring a %s event without a pod name", kind)
            return None
        if kind in ("ADDED", "MODIFIED"):
            members.set(pod.metadata.name, pod_address(pod, self.config.worker_port))
        elif kind == "DELETED":
            members.set(pod.metadata.name, None)
        version = pod.metadata.resource_version
        return str(version) if version else None

    async def _watch(
        self, api: Any, namespace: str, selector: str, version: str
    ) -> AsyncGenerator[Event, None]:
        """One watch from ``version``, run in a daemon thread; ends when the server ends
        it, raises what the client raises (a 410 Gone as ApiException)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event | Exception | None] = asyncio.Queue()
        stream = self._watch_factory()

        def hand_over(item: Event | Exception | None) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens
                loop.call_soon_threadsafe(queue.put_nowait, item)

        def pump() -> None:
            try:
                for event in stream.stream(
                    api.list_namespaced_pod,
                    namespace,
                    label_selector=selector,
                    resource_version=version,
                    allow_watch_bookmarks=True,
                    timeout_seconds=self.watch_timeout_s,
                    # A read timeout past the server's: a dead connection cannot hang us.
                    _request_timeout=(
                        self.request_timeout_s,
                        self.watch_timeout_s + self.request_timeout_s,
                    ),
                ):
                    hand_over(event)
            except Exception as e:
                hand_over(e)
            else:
                hand_over(None)

        threading.Thread(target=pump, name=f"watch {selector}", daemon=True).start()
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            stream.stop()  # also shuts the socket, so a thread blocked in a read ends


async def _in_thread(fn: Callable[[], T]) -> T:
    """``fn()`` in a daemon thread (see the module docstring)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def succeed(result: T) -> None:
        if not future.cancelled():
            future.set_result(result)

    def fail(error: Exception) -> None:
        if not future.cancelled():
            future.set_exception(error)

    def target() -> None:
        try:
            result = fn()
        except Exception as e:
            done: Callable[[], None] = functools.partial(fail, e)
        else:
            done = functools.partial(succeed, result)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            loop.call_soon_threadsafe(done)

    threading.Thread(target=target, name=getattr(fn, "__name__", "call"), daemon=True).start()
    return await future


def _load_core_api() -> Any:
    """A CoreV1Api with the pod's service account, else the local kubeconfig."""
    return client.CoreV1Api(load_api_client("kubernetes discovery"))


def _own_namespace() -> str:
    """The namespace this pod runs in, from its service account; else ``default``."""
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or "default"
    except OSError:
        return "default"
