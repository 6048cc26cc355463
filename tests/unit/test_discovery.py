"""Router discovery: the config it reads, the static list, and Kubernetes pods followed
through a fake CoreV1Api/Watch and through the real client against a small local server
that speaks the Kubernetes list/watch protocol."""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import typer

from pdserve.config import DiscoveryConfig, DiscoveryMode, Role
from pdserve.errors import ConfigError
from pdserve.router.cli import discovery_from_config
from pdserve.router.discovery.base import Discovery
from pdserve.router.discovery.static import StaticDiscovery
from pdserve.router.workers import WorkerPool

try:
    from kubernetes import client as k8s
except ImportError:  # only kubernetes mode needs it
    k8s = None
needs_kubernetes = pytest.mark.skipif(k8s is None, reason="kubernetes client not installed")

SELECTORS = {Role.PREFILL: "pdserve.io/role=prefill", Role.DECODE: "pdserve.io/role=decode"}
CONFIG = DiscoveryConfig(DiscoveryMode.KUBERNETES, "llm", 50100, SELECTORS)
END = object()  # ends a fake watch the way the API server's timeout does


def members(pool: WorkerPool) -> set[tuple[str, Role]]:
    return {(w.address, w.role) for w in pool.workers}


async def until(check: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running(discovery: Discovery) -> AsyncIterator[WorkerPool]:
    pool = WorkerPool("m", rpc_timeout_s=1, poll_interval_s=1)
    task = asyncio.create_task(discovery.run(pool))
    try:
        yield pool
        if task.done():
            task.result()  # discovery must run until cancelled: show why it stopped
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await pool.close()


# --- configuration -------------------------------------------------------------------


def test_config_reads_the_chart_keys(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(
        "discovery:\n  mode: kubernetes\n  namespace: llm\n  workerPort: 50100\n  pools:\n"
        "    prefill: {labelSelector: 'pdserve.io/role=prefill'}\n"
        "    decode: {labelSelector: 'pdserve.io/role=decode'}\n"
        "policy: {prefill: round_robin, decode: least_load}\n"
    )
    assert discovery_from_config(None, path) == CONFIG
    assert discovery_from_config(DiscoveryMode.STATIC, path).mode is DiscoveryMode.STATIC
    assert discovery_from_config(None, None) == DiscoveryConfig()
    path.write_text("discovery: {mode: kubernetes}\n")
    with pytest.raises(typer.BadParameter, match="labelSelector"):
        discovery_from_config(None, path)


@pytest.mark.parametrize(
    "section",
    [
        {"mode": "dns"},
        {"workerPort": "50100"},
        {"workerPort": 70000},
        {"pools": {"router": {"labelSelector": "a=b"}}},
        {"pools": {"decode": {"selector": "a=b"}}},
        {"pools": {"decode": {"labelSelector": ""}}},
        {"namespaces": "llm"},
        {"mode": "kubernetes", "pools": {"decode": {"labelSelector": "a=b"}}},
    ],
)
def test_config_refuses_what_cannot_work(section: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        DiscoveryConfig.from_dict(section)


# --- static list and the pool --------------------------------------------------------


async def test_static_list_joins_at_once_and_remove_leaves() -> None:
    workers = {Role.PREFILL: ["p:1"], Role.DECODE: ["d:1", "d:2", "d:1"]}
    async with running(StaticDiscovery(workers)) as pool:
        await asyncio.sleep(0)
        assert members(pool) == {("p:1", Role.PREFILL), ("d:1", Role.DECODE), ("d:2", Role.DECODE)}
        pool.add(["p:1"], Role.DECODE)
        pool.remove("p:1", Role.DECODE)  # only that role's worker leaves
        pool.remove("d:1")
        assert members(pool) == {("p:1", Role.PREFILL), ("d:2", Role.DECODE)}


# --- Kubernetes, through a fake API -------------------------------------------------


def pod(name: str, ip: str | None, ready: bool = True, version: str = "1", **meta: Any) -> Any:
    condition = k8s.V1PodCondition(type="Ready", status="True" if ready else "False")
    return k8s.V1Pod(
        metadata=k8s.V1ObjectMeta(name=name, resource_version=version, **meta),
        status=k8s.V1PodStatus(pod_ip=ip, conditions=[condition]),
    )


def event(kind: str, pod: Any) -> dict[str, Any]:
    return {"type": kind, "object": pod, "raw_object": pod.to_dict()}


class FakeCluster:
    """A fake CoreV1Api (lists from ``pods``) and Watch (events a test pushes)."""

    def __init__(self) -> None:
        self.pods: dict[str, list[Any]] = defaultdict(list)
        self.version = "1"
        self.list_errors: list[Exception] = []
        self.lists: list[str] = []
        self.watches: list[tuple[str, str]] = []  # (selector, resource_version)
        self.feeds: dict[str, queue.Queue[Any]] = defaultdict(queue.Queue)

    def list_namespaced_pod(self, namespace: str, label_selector: str, **_: Any) -> Any:
        assert namespace == "llm"
        self.lists.append(label_selector)
        if self.list_errors:
            raise self.list_errors.pop(0)
        meta = k8s.V1ListMeta(resource_version=self.version)
        return k8s.V1PodList(items=list(self.pods[label_selector]), metadata=meta)

    def push(self, role: Role, *items: Any) -> None:
        for item in items:
            self.feeds[SELECTORS[role]].put(item)

    def watch(self) -> FakeWatch:
        return FakeWatch(self)

    def discovery(self) -> Any:
        from pdserve.router.discovery.kubernetes import KubernetesDiscovery

        return KubernetesDiscovery(CONFIG, self, self.watch, retry_initial_s=0.01)


class FakeWatch:
    def __init__(self, cluster: FakeCluster) -> None:
        self.cluster = cluster
        self.stopped = threading.Event()

    def stream(self, func: Any, namespace: str, **kwargs: Any) -> Any:
        assert func == self.cluster.list_namespaced_pod and kwargs["timeout_seconds"] > 0
        selector = kwargs["label_selector"]
        self.cluster.watches.append((selector, kwargs["resource_version"]))
        while not self.stopped.is_set():
            try:
                item = self.cluster.feeds[selector].get(timeout=0.01)
            except queue.Empty:
                continue
            if item is END:
                return
            if isinstance(item, Exception):
                raise item
            yield item

    def stop(self) -> None:
        self.stopped.set()


P, D = SELECTORS[Role.PREFILL], SELECTORS[Role.DECODE]


@needs_kubernetes
async def test_ready_pods_join_with_their_role_and_leave_when_not() -> None:
    cluster = FakeCluster()
    cluster.pods[P] = [pod("p0", "10.0.0.1")]
    cluster.pods[D] = [pod("d0", "10.0.1.1"), pod("d1", "10.0.1.2", ready=False)]
    async with running(cluster.discovery()) as pool:
        await until(lambda: len(pool.workers) == 2)
        assert members(pool) == {("10.0.0.1:50100", Role.PREFILL), ("10.0.1.1:50100", Role.DECODE)}
        cluster.push(Role.DECODE, event("MODIFIED", pod("d1", "10.0.1.2", version="2")))
        cluster.push(Role.PREFILL, event("ADDED", pod("p1", None, version="3")))  # no IP yet
        cluster.push(Role.PREFILL, event("ADDED", pod("p2", "fd00::7", version="4")))
        await until(lambda: len(pool.workers) == 4)
        assert ("[fd00::7]:50100", Role.PREFILL) in members(pool)
        assert ("10.0.1.2:50100", Role.DECODE) in members(pool)

        gone = {"deletion_timestamp": datetime.now(UTC)}
        cluster.push(Role.DECODE, event("MODIFIED", pod("d0", "10.0.1.1", False, "5")))
        cluster.push(Role.DECODE, event("MODIFIED", pod("d1", "10.0.1.2", True, "6", **gone)))
        cluster.push(Role.PREFILL, event("DELETED", pod("p0", "10.0.0.1", version="7")))
        cluster.push(Role.PREFILL, event("MODIFIED", pod("p2", "10.0.0.9", version="8")))
        await until(lambda: members(pool) == {("10.0.0.9:50100", Role.PREFILL)})
    assert cluster.lists == [P, D] or cluster.lists == [D, P]


@needs_kubernetes
async def test_gone_relists_and_keeps_the_workers_that_stayed() -> None:
    cluster = FakeCluster()
    cluster.pods[D] = [pod("d0", "10.0.1.1"), pod("d1", "10.0.1.2")]
    async with running(cluster.discovery()) as pool:
        await until(lambda: len(pool.workers) == 2)
        stayed = next(w for w in pool.workers if w.address == "10.0.1.1:50100")
        stayed.healthy, stayed.in_flight = True, 3
        # While the watch was away d1 went and d2 came; the old version is compacted.
        cluster.pods[D] = [pod("d0", "10.0.1.1"), pod("d2", "10.0.1.3")]
        cluster.version = "40"
        cluster.push(Role.DECODE, event("MODIFIED", pod("d0", "10.0.1.1", version="5")))
        cluster.push(Role.DECODE, k8s.ApiException(status=410, reason="Expired"))
        await until(lambda: (D, "40") in cluster.watches)
        assert members(pool) == {("10.0.1.1:50100", Role.DECODE), ("10.0.1.3:50100", Role.DECODE)}
        assert cluster.lists.count(D) == 2 and cluster.lists.count(P) == 1
        again = next(w for w in pool.workers if w.address == "10.0.1.1:50100")
        assert again is stayed and again.healthy and again.in_flight == 3


@needs_kubernetes
async def test_reconnects_after_errors_and_resumes_from_the_last_version() -> None:
    cluster = FakeCluster()
    cluster.list_errors = [k8s.ApiException(status=503, reason="Unavailable")]
    cluster.pods[P] = [pod("p0", "10.0.0.1")]
    async with running(cluster.discovery()) as pool:
        await until(lambda: len(cluster.lists) == 3)  # the failed list was retried
        await until(lambda: len(pool.workers) == 1)
        cluster.push(Role.PREFILL, event("ADDED", pod("p1", "10.0.0.2", version="9")))
        cluster.push(Role.PREFILL, ConnectionResetError("connection reset by peer"))
        await until(lambda: (P, "9") in cluster.watches)
        bookmark = {"type": "BOOKMARK", "raw_object": {"metadata": {"resourceVersion": "12"}}}
        cluster.push(Role.PREFILL, bookmark, END)  # the server's timeout ends this one
        await until(lambda: (P, "12") in cluster.watches)
        cluster.push(Role.PREFILL, event("DELETED", pod("p0", "10.0.0.1", version="13")))
        await until(lambda: members(pool) == {("10.0.0.2:50100", Role.PREFILL)})
        assert cluster.lists.count(P) == 2, "a reconnect resumes the watch, it does not relist"


# --- Kubernetes, the real client against a local API server ---------------------------


class MiniApiServer:
    """Just enough of the Kubernetes API for the real client: list and watch pods of one
    namespace by ``k=v`` label selectors, chunked watch streams, 410 for compacted
    versions."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.version = 1
        self.pods: dict[str, dict[str, Any]] = {}
        self.history: list[tuple[int, str, dict[str, Any]]] = []
        self.compacted = 0  # watches from an older version get 410 Gone
        self.epoch = 0  # a new epoch ends the open watches
        self.lists = 0
        serve = self._serve

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                with contextlib.suppress(OSError):
                    serve(self)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def put(self, name: str, role: str, ip: str, ready: bool = True) -> None:
        status = {"podIP": ip, "conditions": [{"type": "Ready", "status": str(ready)}]}
        self._record(name, {"metadata": {"labels": {"pdserve.io/role": role}}, "status": status})

    def delete(self, name: str) -> None:
        self._record(name, None)

    def expire(self, silently_delete: str) -> None:
        """Compact the history and end the open watches; a pod goes meanwhile, unseen."""
        with self.cond:
            del self.pods[silently_delete]
            self.version += 1
            self.compacted, self.epoch = self.version, self.epoch + 1
            self.cond.notify_all()

    def _record(self, name: str, pod: dict[str, Any] | None) -> None:
        with self.cond:
            self.version += 1
            kind = "DELETED" if pod is None else "MODIFIED" if name in self.pods else "ADDED"
            pod = pod or self.pods.pop(name)
            pod["metadata"].update(name=name, namespace="llm", resourceVersion=str(self.version))
            if kind != "DELETED":
                self.pods[name] = pod
            self.history.append((self.version, kind, json.loads(json.dumps(pod))))
            self.cond.notify_all()

    def _serve(self, req: BaseHTTPRequestHandler) -> None:
        query = parse_qs(urlsplit(req.path).query)
        wanted = dict(t.split("=") for t in query["labelSelector"][0].split(","))

        def matches(pod: dict[str, Any]) -> bool:
            return all(pod["metadata"]["labels"].get(k) == v for k, v in wanted.items())

        req.send_response(200)
        req.send_header("Content-Type", "application/json")
        if query.get("watch", ["false"])[0].lower() != "true":
            with self.cond:
                self.lists += 1
                items = [p for p in self.pods.values() if matches(p)]
                meta = {"resourceVersion": str(self.version)}
            body = json.dumps({"kind": "PodList", "metadata": meta, "items": items}).encode()
            req.send_header("Content-Length", str(len(body)))
            req.end_headers()
            req.wfile.write(body)
            return
        req.send_header("Transfer-Encoding", "chunked")
        req.end_headers()

        def send(obj: dict[str, Any]) -> None:
            line = json.dumps(obj).encode() + b"\n"
            req.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
            req.wfile.flush()

        seen = int(query["resourceVersion"][0])
        deadline = time.monotonic() + int(query["timeoutSeconds"][0])
        with self.cond:
            if seen < self.compacted:
                gone = {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old"}
                send({"type": "ERROR", "object": gone})
            epoch = self.epoch
            while seen >= self.compacted and self.epoch == epoch and time.monotonic() < deadline:
                for version, kind, pod in self.history:
                    if version > seen and matches(pod):
                        send({"type": kind, "object": pod})
                seen = max(seen, self.version)
                self.cond.wait(0.05)
        req.wfile.write(b"0\r\n\r\n")


@needs_kubernetes
async def test_real_client_follows_a_watching_api_server() -> None:
    from pdserve.router.discovery.kubernetes import KubernetesDiscovery

    server = MiniApiServer()
    server.put("p0", "prefill", "10.0.0.1")
    server.put("d0", "decode", "10.0.1.1", ready=False)
    api = k8s.CoreV1Api(k8s.ApiClient(k8s.Configuration(host=server.url)))
    discovery = KubernetesDiscovery(CONFIG, api, retry_initial_s=0.05, watch_timeout_s=5)
    try:
        async with running(discovery) as pool:
            await until(lambda: members(pool) == {("10.0.0.1:50100", Role.PREFILL)})
            server.put("d0", "decode", "10.0.1.1")  # turns ready
            server.put("d1", "decode", "10.0.1.2")
            server.delete("p0")
            server.put("p1", "prefill", "10.0.0.2")
            expected = {
                ("10.0.0.2:50100", Role.PREFILL),
                ("10.0.1.1:50100", Role.DECODE),
                ("10.0.1.2:50100", Role.DECODE),
            }
            await until(lambda: members(pool) == expected)
            d0 = next(w for w in pool.workers if w.address == "10.0.1.1:50100")

            server.expire(silently_delete="d1")  # both watches get 410 and list again
            await until(lambda: server.lists == 4)
            await until(lambda: len(pool.workers) == 2)
            assert next(w for w in pool.workers if w.role is Role.DECODE) is d0
            server.put("d2", "decode", "10.0.1.3")  # the new watch works
            await until(lambda: ("10.0.1.3:50100", Role.DECODE) in members(pool))
    finally:
        server.httpd.shutdown()
