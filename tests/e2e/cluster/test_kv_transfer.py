"""The KV really moves: the decode engine takes the prompt from NIXL, not from its own compute."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.e2e.conftest import Cluster, completion_answer
from tests.e2e.prompts import COMPLETION_CASES

pytestmark = pytest.mark.e2e


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _scrape(port: int) -> str:
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text


def test_prompt_tokens_arrive_by_kv_transfer(cluster: Cluster) -> None:
    decode_port = cluster.metrics_ports["decode-0"]
    prefill_port = cluster.metrics_ports["prefill-0"]
    before = _scrape(decode_port)
    produced_before = _metric(
        _scrape(prefill_port), "pdserve_worker_kv_handles_total", direction="produced"
    )
    prompt, max_tokens = COMPLETION_CASES[14]  # a long, never-before-seen prompt
    answer = completion_answer(cluster.openai(), "unique " + prompt, max_tokens)
    assert answer.token_ids
    after = _scrape(decode_port)
    name = "vllm:prompt_tokens_by_source_total"
    external = _metric(after, name, source="external_kv_transfer") - _metric(
        before, name, source="external_kv_transfer"
    )
    local = _metric(after, name, source="local_compute") - _metric(
        before, name, source="local_compute"
    )
    # Nearly the whole prompt came over NIXL; the decode engine computed at most a few tokens.
    assert external >= 100, (external, local)
    assert local <= 16 + 1, (external, local)
    produced = _metric(
        _scrape(prefill_port), "pdserve_worker_kv_handles_total", direction="produced"
    )
    assert produced == produced_before + 1
    router = httpx.get(f"{cluster.http}/metrics", timeout=10).text
    assert _metric(router, "pdserve_router_routing_decisions_total", mode="disaggregated") >= 1


def test_cancelled_stream_frees_the_decode_worker(cluster: Cluster) -> None:
    """A client that hangs up mid-stream: the request is aborted on the workers."""
    body = {"model": "tiny-llama", "prompt": "The", "max_tokens": 400, "temperature": 0,
            "stream": True, "ignore_eos": True}  # fmt: skip
    with httpx.stream("POST", f"{cluster.http}/v1/completions", json=body, timeout=180) as r:
        events = 0
        for line in r.iter_lines():
            events += line.startswith("data:")
            if events >= 5:
                break  # hang up, with the decode stage running (prefill makes 1 token)
    # The decode worker must record the cancellation, and no worker keep it running.
    # (A hang-up between the stages would cancel no worker call: the prefill call had
    # finished, and counts as ok.)
    deadline = time.monotonic() + 60
    while True:
        texts = [_scrape(port) for port in cluster.metrics_ports.values()]
        running = sum(_metric(t, "vllm:num_requests_running") for t in texts)
        cancelled = sum(
            _metric(t, "pdserve_worker_requests_total", status="cancelled") for t in texts
        )
        if (running == 0 and cancelled >= 1) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert running == 0 and cancelled >= 1, (running, cancelled)
