"""A real Prometheus scrapes the running cluster: the numbers it stores agree with what the
client measured, and every metric the dashboard and alerts query is really exported."""

from __future__ import annotations

import json
import shutil
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator

import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e import processes
from tests.e2e.conftest import Cluster
from tests.e2e.prompts import COMPLETION_CASES, SERVED_NAME
from tests.unit.test_dashboards import alert_rules, dashboard_queries, metric_names

pytestmark = pytest.mark.e2e
PROMETHEUS_PORT = 28990
# Series that exist only after a fault or on other deployments (Kubernetes `up` relabels,
# failure counters): the dashboard shows them when they appear.
NOT_YET_EXPORTED_OK = {
    "up",
    # labelled counters that appear with their first event (a retry, a migration, a 429)
    "pdserve_router_retries_total",
    "pdserve_router_migrations_total",
    "pdserve_router_rejected_requests_total",
    # kv_aware routing policies only (this cluster routes round robin / least load)
    "pdserve_router_prefix_cache_tokens_total",
    # --kv-transport grpc only (this cluster uses NIXL)
    "pdserve_kv_transfer_bytes_sent_total",
    "pdserve_kv_transfer_bytes_received_total",
    "pdserve_kv_transfer_shm_bytes_received_total",
    "pdserve_kv_transfer_duration_seconds_bucket",
    "pdserve_kv_transfer_lease_expirations_total",
}


def _query(expr: str) -> float:
    url = f"http://127.0.0.1:{PROMETHEUS_PORT}/api/v1/query?" + urllib.parse.urlencode(
        {"query": expr}
    )
    with urllib.request.urlopen(url, timeout=10) as r:
        result = json.load(r)["data"]["result"]
    return sum(float(s["value"][1]) for s in result)


def _names() -> set[str]:
    url = f"http://127.0.0.1:{PROMETHEUS_PORT}/api/v1/label/__name__/values"
    with urllib.request.urlopen(url, timeout=10) as r:
        return set(json.load(r)["data"])


@pytest.fixture(scope="module")
def prometheus(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the prometheus server is not installed (Debian package prometheus)")
    work = tmp_path_factory.mktemp("prometheus")
    router = cluster.http.removeprefix("http://")
    workers = [f"127.0.0.1:{port}" for port in cluster.metrics_ports.values()]
    config = work / "prometheus.yml"
    config.write_text(
        json.dumps(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [
                    {"job_name": "router", "static_configs": [{"targets": [router]}]},
                    {"job_name": "workers", "static_configs": [{"targets": workers}]},
                ],
            }
        )
    )
    argv = [
        binary, f"--config.file={config}", f"--storage.tsdb.path={work / 'data'}",
        f"--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}",
    ]  # fmt: skip
    log = work / "prometheus.log"
    proc = processes.start(argv, log)
    try:
        processes.wait_http_ok(f"http://127.0.0.1:{PROMETHEUS_PORT}/-/ready", proc, log, 60)
        deadline = time.monotonic() + 30
        while _query("sum(up)") < 1 + len(workers) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _query("sum(up)") == 1 + len(workers), processes.tail(log)
        yield
    finally:
        processes.stop(proc, timeout_s=10)


def _scraped(targets: list[str], sample: str, labels: dict[str, str] | None = None) -> float:
    """The sum of ``sample`` over ``targets``, read from their /metrics directly."""
    total = 0.0
    for target in targets:
        with urllib.request.urlopen(f"http://{target}/metrics", timeout=10) as r:
            text = r.read().decode()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == sample and all(
                    s.labels.get(k) == v for k, v in (labels or {}).items()
                ):
                    total += s.value
    return total


def _in_sync(
    expr: str, targets: list[str], sample: str, labels: dict[str, str] | None = None
) -> float:
    """Wait until Prometheus stores what the targets export now (scrapes lag and can be
    late on busy cores); returns that value."""
    deadline = time.monotonic() + 30
    while True:
        exported, stored = _scraped(targets, sample, labels), _query(expr)
        if stored == exported:
            return stored
        assert time.monotonic() < deadline, f"{expr}: Prometheus has {stored}, targets {exported}"
        time.sleep(0.5)


def test_prometheus_agrees_with_the_client(cluster: Cluster, prometheus: None) -> None:
    router = [cluster.http.removeprefix("http://")]
    workers = [f"127.0.0.1:{port}" for port in cluster.metrics_ports.values()]
    # (PromQL, where it is exported, the sample, its labels)
    series = {
        "ttft_count": (
            "sum(pdserve_router_time_to_first_token_seconds_count)",
            router, "pdserve_router_time_to_first_token_seconds_count", None,
        ),
        "ttft_sum": (
            "sum(pdserve_router_time_to_first_token_seconds_sum)",
            router, "pdserve_router_time_to_first_token_seconds_sum", None,
        ),
        "produced": (
            'sum(pdserve_worker_kv_handles_total{direction="produced"})',
            workers, "pdserve_worker_kv_handles_total", {"direction": "produced"},
        ),
        "transfers": (
            "sum(vllm:nixl_xfer_time_seconds_count)",
            workers, "vllm:nixl_xfer_time_seconds_count", None,
        ),
        "fallbacks": (
            'sum(pdserve_router_routing_decisions_total{mode="fallback_colocated"})',
            router, "pdserve_router_routing_decisions_total", {"mode": "fallback_colocated"},
        ),
    }  # fmt: skip
    before = {key: _in_sync(*spec) for key, spec in series.items()}

    client = OpenAI(base_url=f"{cluster.http}/v1", api_key="unused", max_retries=0)
    client_ttfts = []
    requests = 6
    for i in range(requests):
        prompt, _ = COMPLETION_CASES[8 + i]
        started = time.monotonic()
        stream = client.completions.create(
            model=SERVED_NAME,
            prompt=f"load {i} {prompt}",
            max_tokens=8,
            temperature=0,
            stream=True,
            # Token ids in every chunk: the tiny model's first token may have no text.
            extra_body={"return_token_ids": True},
        )
        first = None
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].model_extra.get("token_ids"):
                first = time.monotonic() - started
        assert first is not None
        client_ttfts.append(first)

    delta = {key: _in_sync(*spec) - before[key] for key, spec in series.items()}
    assert delta["ttft_count"] == requests
    # The router's clock starts after the client's and stops before the client sees the
    # token: it may be smaller, never larger, and not by much on loopback.
    assert delta["ttft_sum"] <= sum(client_ttfts) + 0.05
    assert delta["ttft_sum"] >= 0.5 * sum(client_ttfts), (delta["ttft_sum"], client_ttfts)
    assert delta["produced"] == requests
    # A request whose decode call failed before its first token was served colocated
    # (counted as a fallback) and moved no KV; every other one pulled its KV over NIXL.
    assert delta["transfers"] >= requests - delta["fallbacks"]


def test_every_queried_metric_is_exported(cluster: Cluster, prometheus: None) -> None:
    exported = _names()
    queried: set[str] = set()
    for expr in dashboard_queries():
        queried |= metric_names(expr)
    for rule in alert_rules():
        queried |= metric_names(str(rule["expr"]))
    # Failure counters appear on first failure; all other series must be live here.
    missing = {
        name
        for name in queried - exported - NOT_YET_EXPORTED_OK
        if not name.endswith(("_failures_total", "_incompatible_total"))
    }
    assert not missing, f"queried but not exported by a running cluster: {sorted(missing)}"


def test_engine_metrics_carry_the_worker_role(cluster: Cluster, prometheus: None) -> None:
    # This scrape config adds no labels: the role comes from the workers themselves, which
    # is what lets the dashboard's pool rows work outside Kubernetes too.
    for role in ("prefill", "decode"):
        for name in ("vllm:num_requests_running", "vllm:kv_cache_usage_perc"):
            assert _query(f'count({name}{{role="{role}"}})') == 1, (name, role)
    assert _query('count(vllm:num_requests_running{role=""})') == 0
    # The decode worker pulls KV over NIXL: its transfer histogram is labelled decode.
    assert _query('sum(vllm:nixl_xfer_time_seconds_count{role="decode"})') >= 1
