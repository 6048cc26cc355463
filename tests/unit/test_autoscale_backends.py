"""Autoscaler plumbing: percentiles and rates from real /metrics text, one loop tick from a
router's metrics to a scaling call, and the Kubernetes scaler against a small HTTP server
speaking the scale subresource API through the real client."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from kubernetes import client  # type: ignore[import-not-found, unused-ignore]
from prometheus_client import CollectorRegistry, generate_latest

from pdserve.autoscale.loop import Autoscaler
from pdserve.autoscale.policy import PoolLimits, Slo, SloPlanner
from pdserve.autoscale.scaler import KubernetesScaler, PoolSize, Scaler, Workload
from pdserve.autoscale.signals import (
    MetricsSource,
    engine_gauges,
    histogram_quantile,
    parse_router,
    window,
)
from pdserve.config import Role
from pdserve.errors import ConfigError, ScalingError
from pdserve.metrics import RouterMetrics, serve_metrics


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    buckets = {0.1: 10.0, 0.5: 50.0, 1.0: 90.0, float("inf"): 100.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.5)
    assert histogram_quantile(0.9, buckets) == pytest.approx(1.0)
    assert histogram_quantile(0.3, buckets) == pytest.approx(0.3)
    assert histogram_quantile(0.99, buckets) == 1.0  # in +Inf: the highest finite bound
    assert histogram_quantile(0.9, {0.1: 0.0, float("inf"): 0.0}) is None


def test_a_window_of_router_metrics() -> None:
    registry = CollectorRegistry()
    metrics = RouterMetrics(registry)
    for _ in range(10):
        metrics.ttft.labels("disaggregated").observe(0.2)  # before the window
    before = parse_router(generate_latest(registry).decode(), at=100.0)
    # In the window: 18 fast first tokens and 2 slow ones, in two modes.
    for _ in range(18):
        metrics.ttft.labels("disaggregated").observe(0.3)
    metrics.ttft.labels("colocated").observe(4.0)
    metrics.ttft.labels("colocated").observe(4.0)
    for _ in range(100):
        metrics.itl.labels("disaggregated").observe(0.03)
    metrics.prompt_tokens.inc(2000)
    metrics.generation_tokens.inc(640)
    after = parse_router(generate_latest(registry).decode(), at=110.0)
    s = window(before, after)
    assert s.request_rate == pytest.approx(2.0)
    assert s.prompt_tokens_per_s == pytest.approx(200.0)
    assert s.generation_tokens_per_s == pytest.approx(64.0)
    # p90 of 20: the 18th observation, inside the (0.25, 0.5] bucket, not the old 0.2s.
    assert s.ttft_p90_s is not None and 0.25 < s.ttft_p90_s <= 0.5
    assert s.itl_p90_s is not None and 0.02 < s.itl_p90_s <= 0.04


def test_engine_gauges_sum_queues_and_average_kv_usage() -> None:
    worker = (
        "# TYPE vllm:num_requests_waiting gauge\n"
        'vllm:num_requests_waiting{{model_name="m"}} {w}\n'
        "# TYPE vllm:kv_cache_usage_perc gauge\n"
        'vllm:kv_cache_usage_perc{{model_name="m"}} {u}\n'
    )
    waiting, usage = engine_gauges([worker.format(w=3, u=0.5), worker.format(w=1, u=0.9)])
    assert waiting == 4 and usage == pytest.approx(0.7)


class MemoryScaler(Scaler):
    """A backend that converges at once (fine in a unit test of the loop)."""

    def __init__(self, sizes: dict[Role, int]) -> None:
        self.targets = dict(sizes)
        self.calls: list[tuple[Role, int]] = []

    def sizes(self) -> dict[Role, PoolSize]:
        return {r: PoolSize(n, n) for r, n in self.targets.items()}

    def scale(self, role: Role, replicas: int) -> None:
        self.calls.append((role, replicas))
        self.targets[role] = replicas


def test_one_tick_from_router_metrics_to_a_scaling_call() -> None:
    registry = CollectorRegistry()
    metrics = RouterMetrics(registry)
    server = serve_metrics("127.0.0.1", 0, registry)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        scaler = MemoryScaler({Role.PREFILL: 1, Role.DECODE: 1})
        limits = PoolLimits(min_replicas=1, max_replicas=4)
        planner = SloPlanner(
            Slo(ttft_p90_s=1.0, itl_p90_s=0.1), {r: limits for r in scaler.targets}
        )
        clock = iter([0.0, 30.0, 60.0])
        autoscaler = Autoscaler(MetricsSource(url), planner, scaler, clock=lambda: next(clock))
        assert autoscaler.tick() == []  # the first reading only sets the baseline
        for _ in range(20):
            metrics.ttft.labels("disaggregated").observe(0.4)
            metrics.itl.labels("disaggregated").observe(0.35)  # decode is 3.5x too slow
        decisions = autoscaler.tick()
        assert scaler.calls == [(Role.DECODE, 3)]
        assert {d.role: d.desired for d in decisions} == {Role.PREFILL: 1, Role.DECODE: 3}
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(ScalingError, match="cannot scrape"):
        MetricsSource(url, timeout_s=1).scrape(0.0)


class MiniAppsApi:
    """The scale subresource of Deployments and StatefulSets, as the API server serves it."""

    def __init__(self) -> None:
        self.replicas: dict[tuple[str, str], int] = {
            ("deployments", "pd-decode"): 2,
            ("statefulsets", "pd-prefill"): 1,
        }
        self.patches: list[tuple[str, str, Any]] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                api.serve(self, None)

            def do_PATCH(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                api.serve(self, json.loads(self.rfile.read(length)))

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def serve(self, req: BaseHTTPRequestHandler, patch: Any) -> None:
        parts = req.path.split("?")[0].strip("/").split("/")
        # apis/apps/v1/namespaces/{ns}/{kind}/{name}/scale
        if (
            len(parts) != 8
            or parts[:4] != ["apis", "apps", "v1", "namespaces"]
            or parts[7] != "scale"
        ):
            return self._send(req, 404, {"kind": "Status", "code": 404, "reason": "NotFound"})
        namespace, kind, name = parts[4], parts[5], parts[6]
        if namespace != "serving" or (kind, name) not in self.replicas:
            return self._send(req, 404, {"kind": "Status", "code": 404, "reason": "NotFound"})
        if patch is not None:
            self.patches.append((req.headers["Content-Type"], f"{kind}/{name}", patch))
            self.replicas[(kind, name)] = int(patch["spec"]["replicas"])
        n = self.replicas[(kind, name)]
        self._send(
            req,
            200,
            {
                "apiVersion": "autoscaling/v1",
                "kind": "Scale",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {"replicas": n},
                "status": {"replicas": max(0, n - 1) if patch is not None else n},
            },
        )

    @staticmethod
    def _send(req: BaseHTTPRequestHandler, status: int, doc: dict[str, Any]) -> None:
        body = json.dumps(doc).encode()
        req.send_response(status)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        req.wfile.write(body)


@pytest.fixture
def apps_api() -> Iterator[tuple[MiniAppsApi, Any]]:
    server = MiniAppsApi()
    configuration = client.Configuration()
    configuration.host = f"http://127.0.0.1:{server.httpd.server_address[1]}"
    try:
        yield server, client.AppsV1Api(client.ApiClient(configuration))
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()


def test_kubernetes_scaler_reads_and_patches_the_scale_subresource(
    apps_api: tuple[MiniAppsApi, Any],
) -> None:
    server, api = apps_api
    scaler = KubernetesScaler(
        "serving",
        {
            Role.PREFILL: Workload("StatefulSet", "pd-prefill"),
            Role.DECODE: Workload("Deployment", "pd-decode"),
        },
        api=api,
    )
    assert scaler.sizes() == {Role.PREFILL: PoolSize(1, 1), Role.DECODE: PoolSize(2, 2)}
    scaler.scale(Role.DECODE, 3)
    scaler.scale(Role.PREFILL, 2)
    assert [(who, body) for _, who, body in server.patches] == [
        ("deployments/pd-decode", {"spec": {"replicas": 3}}),
        ("statefulsets/pd-prefill", {"spec": {"replicas": 2}}),
    ]
    assert all("patch" in content_type for content_type, _, _ in server.patches)
    assert server.replicas[("deployments", "pd-decode")] == 3


def test_kubernetes_scaler_errors_are_typed(apps_api: tuple[MiniAppsApi, Any]) -> None:
    _, api = apps_api
    missing = KubernetesScaler("serving", {Role.DECODE: Workload("Deployment", "nope")}, api=api)
    with pytest.raises(ScalingError, match="404"):
        missing.sizes()
    with pytest.raises(ConfigError, match="no prefill workload"):
        missing.scale(Role.PREFILL, 1)
    with pytest.raises(ConfigError, match="DaemonSet"):
        KubernetesScaler("serving", {Role.DECODE: Workload("DaemonSet", "x")}, api=api)
