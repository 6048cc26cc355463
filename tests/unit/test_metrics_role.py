"""A worker's /metrics re-exports vLLM's engine metrics with the worker's `role` label."""

from __future__ import annotations

import urllib.request

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.parser import text_string_to_metric_families

from pdserve.metrics import ROLE_LABEL, WorkerMetrics, serve_metrics


def _registry() -> CollectorRegistry:
    """What a worker process holds: vLLM's metrics (labelled by model and engine) and ours."""
    registry = CollectorRegistry()
    engine = ["model_name", "engine"]
    running = Gauge("vllm:num_requests_running", "running", engine, registry=registry)
    running.labels("m", "0").set(3)
    prompt = Counter("vllm:prompt_tokens", "prompt tokens", engine, registry=registry)
    prompt.labels("m", "0").inc(120)
    xfer = Histogram("vllm:nixl_xfer_time_seconds", "xfer", engine, registry=registry)
    xfer.labels("m", "0").observe(0.02)
    # A vLLM series that already names a role keeps it.
    Gauge("vllm:labelled", "has a role", ["role"], registry=registry).labels("prefill").set(1)
    WorkerMetrics(registry, "decode").in_flight.labels("decode").set(2)
    Counter("process_cpu_other", "not vLLM", registry=registry).inc()
    return registry


def _scrape(role: str | None) -> dict[str, list[tuple[dict[str, str], float]]]:
    server = serve_metrics("127.0.0.1", 0, _registry(), role=role)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples


def test_vllm_series_get_the_worker_role() -> None:
    samples = _scrape("decode")
    for name in (
        "vllm:num_requests_running",
        "vllm:prompt_tokens_total",
        "vllm:nixl_xfer_time_seconds_bucket",
        "vllm:nixl_xfer_time_seconds_count",
    ):
        assert samples[name], name
        for labels, _ in samples[name]:
            assert labels[ROLE_LABEL] == "decode", (name, labels)
            assert labels["model_name"] == "m" and labels["engine"] == "0"
    assert samples["vllm:num_requests_running"] == [
        ({"model_name": "m", "engine": "0", "role": "decode"}, 3.0)
    ]
    assert samples["vllm:prompt_tokens_total"][0][1] == 120
    assert samples["vllm:nixl_xfer_time_seconds_count"][0][1] == 1


def test_other_series_are_left_as_they_are() -> None:
    samples = _scrape("decode")
    assert samples["vllm:labelled"] == [({"role": "prefill"}, 1.0)]
    assert samples["pdserve_worker_requests_in_flight"] == [({"role": "decode"}, 2.0)]
    assert samples["process_cpu_other_total"] == [({}, 1.0)]


def test_without_a_role_nothing_changes() -> None:
    samples = _scrape(None)
    assert samples["vllm:num_requests_running"] == [({"model_name": "m", "engine": "0"}, 3.0)]
