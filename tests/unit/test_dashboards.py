"""The Grafana dashboard and the alert rules query only metrics that pdserve or vLLM export.

pdserve's names come from pdserve/metrics.py (registered on a fresh registry, so histogram
and counter suffixes are the ones Prometheus really sees); vLLM's are listed below. Alert
rules also get `promtool check rules` and their unit tests when promtool is installed.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from pdserve.kv_transfer.grpc_metrics import families as kv_families
from pdserve.metrics import RouterMetrics, WorkerMetrics
from pdserve.v1 import kv_transfer_pb2 as kv_pb

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy/grafana/pdserve.json"
DASHBOARD_BUILDER = ROOT / "deploy/grafana/build_dashboard.py"
ALERTS = ROOT / "deploy/prometheus/alerts.yaml"
ALERT_TESTS = ROOT / "deploy/prometheus/alerts_test.yaml"
CHART_FILES = ROOT / "deploy/helm/pdserve/files"
RUNBOOKS = ROOT / "docs/runbooks.md"

# vLLM engine metrics the dashboard and alerts may use, by type (vLLM 0.32 names).
VLLM_METRICS = {
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:prefix_cache_queries": "counter",
    "vllm:prefix_cache_hits": "counter",
    "vllm:prompt_tokens": "counter",
    "vllm:prompt_tokens_by_source": "counter",
    "vllm:generation_tokens": "counter",
    "vllm:num_preemptions": "counter",
    "vllm:request_queue_time_seconds": "histogram",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:nixl_xfer_time_seconds": "histogram",
    "vllm:nixl_bytes_transferred": "histogram",
    "vllm:nixl_num_failed_transfers": "counter",
    "vllm:nixl_num_kv_expired_reqs": "counter",
}
# Series Prometheus itself writes for every target.
PROMETHEUS_SERIES = {"up"}

_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
_KEYWORDS |= {"and", "or", "unless", "inf", "nan"}
_IDENTIFIER = re.compile(r"(?<![\w:$.])([a-zA-Z_:][a-zA-Z0-9_:]*)")


def _exposed(name: str, kind: str) -> set[str]:
    base = name.removesuffix("_total") if kind == "counter" else name
    return {base + suffix for suffix in _SUFFIXES[kind]}


def pdserve_series() -> set[str]:
    """Every series name pdserve's metric objects expose, with the grpc KV transport's
    (collected from the engine ranks by the worker)."""
    registry = CollectorRegistry()
    RouterMetrics(registry)
    WorkerMetrics(registry, "prefill")
    stats = kv_pb.KvTransferStats(
        failures={"timeout": 1},
        latency_bucket_bounds=[1, float("inf")],
        latency_bucket_counts=[0, 0],
    )
    grpc_kv = kv_families("decode", stats)
    names: set[str] = set()
    for family in [*registry.collect(), *grpc_kv]:
        names |= _exposed(family.name, family.type)
    return names


def known_series() -> set[str]:
    names = pdserve_series() | PROMETHEUS_SERIES
    for name, kind in VLLM_METRICS.items():
        names |= _exposed(name, kind)
    return names


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords,
    label names or parts of strings, durations and grouping clauses."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name = match.group(1)
        rest = text[match.end() :].lstrip()
        if name.lower() in _KEYWORDS or rest.startswith("("):
            continue
        names.add(name)
    return names


def dashboard_queries() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    for variable in board["templating"]["list"]:
        query = variable.get("query")
        if variable["type"] == "query" and isinstance(query, str):
            # label_values(METRIC, LABEL) -> METRIC
            match = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)
            assert match, f"unexpected variable query {query!r}"
            exprs.append(match.group(1))
    return exprs


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_extractor_finds_metrics_not_functions_or_labels() -> None:
    expr = (
        'histogram_quantile(0.9, sum by (le, role) (rate(foo_bucket{role="by"}[5m]))) '
        '/ on (namespace) group_left max(up{job="x"}) > bool 2 unless vllm:a_total offset 5m'
    )
    assert metric_names(expr) == {"foo_bucket", "up", "vllm:a_total"}


def test_there_are_queries_to_check() -> None:
    assert len(dashboard_queries()) >= 30
    assert len(alert_rules()) >= 8


@pytest.mark.parametrize(
    ("source", "exprs"),
    [("dashboard", dashboard_queries()), ("alerts", [r["expr"] for r in alert_rules()])],
)
def test_queries_use_only_exported_metrics(source: str, exprs: list[str]) -> None:
    known = known_series()
    unknown = {name: expr for expr in exprs for name in metric_names(expr) - known}
    assert not unknown, f"{source} queries metrics nobody exports: {unknown}"


def test_queries_parse_as_promql() -> None:
    parser = pytest.importorskip("promql_parser")
    exprs = dashboard_queries() + [r["expr"] for r in alert_rules()]
    known = known_series()
    for expr in exprs:
        ast = parser.parse(expr.replace("$__rate_interval", "5m"))
        found: set[str] = set()

        def visit(node: Any, found: set[str] = found) -> None:
            if isinstance(node, parser.VectorSelector) and node.name:
                found.add(node.name)

        parser.walk(ast, visit)
        assert found <= known, f"{expr}: {found - known}"
        assert found == metric_names(expr), expr


def test_vllm_names_exist_in_the_installed_vllm() -> None:
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        pytest.skip("vllm is not installed")
    package = Path(spec.origin).parent
    sources = [
        package / "v1/metrics/loggers.py",
        package / "distributed/kv_transfer/kv_connector/v1/nixl/stats.py",
    ]
    text = "".join(p.read_text() for p in sources if p.is_file())
    missing = [name for name in VLLM_METRICS if f'"{name}"' not in text]
    assert not missing, f"vLLM no longer defines {missing}"


def test_alerts_are_complete_and_have_runbooks() -> None:
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", line[3:].strip().lower()).replace(" ", "-")
        for line in RUNBOOKS.read_text().splitlines()
        if line.startswith("## ")
    }
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) == len(set(names))
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        notes = rule["annotations"]
        assert notes["summary"] and notes["description"], rule["alert"]
        page, _, anchor = notes["runbook_url"].partition("#")
        assert page == "docs/runbooks.md" and anchor == rule["alert"].lower(), rule["alert"]
        assert anchor in anchors, f"docs/runbooks.md has no section for {rule['alert']}"


def test_alerts_cover_the_operational_signals() -> None:
    exprs = " ".join(r["expr"] for r in alert_rules())
    for metric in (
        "pdserve_router_time_to_first_token_seconds_bucket",
        "pdserve_router_inter_token_latency_seconds_bucket",
        "pdserve_router_requests_total",
        "pdserve_router_workers_healthy",
        "vllm:nixl_num_failed_transfers_total",
        "vllm:kv_cache_usage_perc",
        "up",
    ):
        assert metric in exprs


def test_dashboard_layout() -> None:
    board = json.loads(DASHBOARD.read_text())
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert rows == [
        "Overview", "Prefill pool", "Decode pool", "KV transfer", "Routing and cache",
        "Reliability",
    ]  # fmt: skip
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)) and all(refs), panel["title"]


def test_chart_carries_the_same_dashboard_and_rules() -> None:
    assert (CHART_FILES / "pdserve.json").read_text() == DASHBOARD.read_text(), (
        "run: python deploy/grafana/build_dashboard.py"
    )
    assert (CHART_FILES / "alerts.yaml").read_text() == ALERTS.read_text(), (
        "run: cp deploy/prometheus/alerts.yaml deploy/helm/pdserve/files/alerts.yaml"
    )


def test_dashboard_json_is_generated_from_the_builder() -> None:
    pytest.importorskip("grafana_foundation_sdk")
    spec = importlib.util.spec_from_file_location("build_dashboard", DASHBOARD_BUILDER)
    assert spec is not None and spec.loader is not None
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    assert builder.render() == DASHBOARD.read_text(), (
        "deploy/grafana/pdserve.json is stale: run python deploy/grafana/build_dashboard.py"
    )


@pytest.mark.parametrize(
    "args", [["check", "rules", str(ALERTS)], ["test", "rules", str(ALERT_TESTS)]]
)
def test_promtool(args: list[str]) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package: prometheus)")
    result = subprocess.run(
        [promtool, *args], capture_output=True, text=True, timeout=60, cwd=ALERTS.parent
    )
    assert result.returncode == 0, result.stdout + result.stderr
