"""`pdserve scale` on a running `pdserve up` cluster: decode 1 -> 2 under load and back,
with no failed request and every answer token-identical to plain vLLM."""

from __future__ import annotations

import itertools
import subprocess
import threading
import time

import httpx
import pytest

from tests.e2e import processes
from tests.e2e.conftest import Answer, Cluster, Reference, completion_answer
from tests.e2e.prompts import COMPLETION_CASES
from tests.e2e.scaling.conftest import CONTROL_PORT, METRICS_BASE_PORT

pytestmark = pytest.mark.e2e

CLIENTS = 2


class Load:
    """Clients that send completions one after another until stopped, and keep every
    answer and every error."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.answers: list[tuple[int, Answer]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._cases = itertools.count()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(CLIENTS)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=180)

    def _run(self) -> None:
        client = self.cluster.openai()
        while not self._stop.is_set():
            with self._lock:
                case = next(self._cases) % len(COMPLETION_CASES)
            prompt, max_tokens = COMPLETION_CASES[case]
            try:
                answer = completion_answer(client, prompt, max_tokens)
            except Exception as e:  # every failure counts: the test expects none
                with self._lock:
                    self.errors.append(f"case {case}: {e!r}")
                continue
            with self._lock:
                self.answers.append((case, answer))

    def count(self) -> int:
        with self._lock:
            return len(self.answers) + len(self.errors)


def scale(role: str, replicas: int) -> str:
    """`pdserve scale` as a user runs it; returns its output."""
    result = subprocess.run(
        [processes.PYTHON, "-m", "pdserve.cli", "scale", role, str(replicas),
         "--control-url", f"http://127.0.0.1:{CONTROL_PORT}", "--timeout-s", "600"],
        capture_output=True, text=True, timeout=660,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def pools() -> dict[str, dict[str, object]]:
    reply = httpx.get(f"http://127.0.0.1:{CONTROL_PORT}/v1/pools", timeout=10).json()
    return reply["pools"]  # type: ignore[no-any-return]


def worker_requests(metrics_port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("pdserve_worker_requests_total{") and 'status="ok"' in line
    )


def wait_count(load: Load, at_least: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while load.count() < at_least:
        assert time.monotonic() < deadline, "the load made no progress"
        time.sleep(0.2)


def test_decode_scales_out_under_load_and_back_without_failures(
    scalable_cluster: Cluster, reference: Reference
) -> None:
    with Load(scalable_cluster) as load:
        wait_count(load, 4)
        assert "decode 2" in scale("decode", 2)
        workers = pools()["decode"]["workers"]
        assert [w["state"] for w in workers] == ["serving", "serving"]  # type: ignore[index]
        # The new decode worker (slot 2: prefill-0 and decode-0 hold 0 and 1) takes
        # part of the load.
        new_worker_metrics = METRICS_BASE_PORT + 2
        served_before = worker_requests(new_worker_metrics)
        deadline = time.monotonic() + 120
        while worker_requests(new_worker_metrics) < served_before + 3:
            assert time.monotonic() < deadline, "the new decode worker got no requests"
            time.sleep(0.5)
        during = load.count()
        assert "decode 1" in scale("decode", 1)
        wait_count(load, during + 4)
    assert [w["name"] for w in pools()["decode"]["workers"]] == ["decode-0"]  # type: ignore[index]
    assert not load.errors, load.errors
    assert len(load.answers) >= 12
    for case, answer in load.answers:
        assert answer == reference.completions[case], case
    # The launcher stopped the leaving worker only after the router had drained it.
    log = scalable_cluster.log.read_text()
    assert "decode-1 drained by the router; stopping it" in log
    assert "decode-1 stopped" in log
