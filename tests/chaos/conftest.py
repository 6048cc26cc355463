"""One real cluster for the chaos suite: a router and 1 prefill + 2 decode workers on the
tiny model (eager engines), each its own process group so a test can SIGKILL, SIGSTOP
or SIGTERM exactly one worker (with its engine-core process). Ports 20000-20999, below
the ephemeral range (32768+), so that no outgoing connection can take one.

Start-up: three engines starting together, about 2 minutes on 2 cores (seconds with
``PDSERVE_CHAOS_TOY=1``: toy workers, no engines). Workers that a
test kills stay dead unless the test restarts them (``ChaosCluster.restart``): the router
goes on without them, as in production (see docs/operations.md, "Failures").
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from pdserve.models import resolve_model
from tests.e2e import processes
from tests.e2e.prompts import MAX_MODEL_LEN, SERVED_NAME

HTTP_PORT, GRPC_PORT = 20000, 20001
ROUTER = f"http://127.0.0.1:{HTTP_PORT}"
# Router settings the assertions depend on.
CHECK_TIMEOUT_S = 1.0
BREAKER_FAILURES = 2
BREAKER_COOLDOWN_S = 2.0
POLL_INTERVAL_S = 1.0  # RouterConfig default
MAX_IN_FLIGHT = 8
MAX_QUEUE = 8
START_TIMEOUT_S = 600
# Fast mode: toy workers (tests/chaos/toy_worker.py) instead of vLLM engines -- the same
# processes, signals, router and assertions, without the engines' start-up.
TOY = os.environ.get("PDSERVE_CHAOS_TOY") == "1"


@dataclass
class Worker:
    name: str  # also its worker id
    role: str
    port: int
    metrics_port: int
    argv: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {"VLLM_CPU_KVCACHE_SPACE": "1"}
        self.proc = processes.start(self.argv, self.log, env=env)

    def signal(self, sig: int) -> None:
        """To the whole process group: the worker and its engine-core process."""
        assert self.proc is not None
        os.killpg(self.proc.pid, sig)

    def metric(self, prefix: str) -> float:
        """Sum of the worker's samples whose name starts with ``prefix``."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(prefix) and not line.startswith("#")
        )


@dataclass
class FaultRow:
    fault: str
    sent: int
    correct: int
    failed_cleanly: int

    @property
    def lost(self) -> int:
        return self.sent - self.correct - self.failed_cleanly


@dataclass
class ChaosCluster:
    router: subprocess.Popen[bytes]
    workers: dict[str, Worker]
    log_dir: Path
    table: list[FaultRow] = field(default_factory=list)

    def router_metric(self, name: str, **labels: str) -> float:
        text = httpx.get(f"{ROUTER}/metrics", timeout=10).text
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        total = 0.0
        for line in text.splitlines():
            m = re.match(r"^([a-zA-Z_:]+)(?:\{(.*)\})? (\S+)$", line)
            if not m or m.group(1) != name:
                continue
            have = ",".join(sorted((m.group(2) or "").split(","))) if m.group(2) else ""
            if all(part in have.split(",") for part in want.split(",") if part):
                total += float(m.group(3))
        return total

    def breaker_state(self, worker: Worker) -> float:
        return self.router_metric(
            "pdserve_router_worker_circuit_state", worker=worker.address, role=worker.role
        )

    def healthy(self, role: str) -> float:
        return self.router_metric("pdserve_router_workers_healthy", role=role)

    def wait_healthy(self, counts: dict[str, int], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if all(self.healthy(role) == n for role, n in counts.items()):
                    return
            except httpx.HTTPError:
                pass
            for w in self.workers.values():
                if w.proc is not None and w.proc.poll() is not None:
                    raise RuntimeError(f"{w.name} exited:\n{processes.tail(w.log)}")
            time.sleep(1)
        raise TimeoutError(f"workers not healthy {counts} after {timeout_s} s")

    def restart(self, name: str) -> None:
        worker = self.workers[name]
        if worker.proc is not None:
            processes.stop(worker.proc, signal.SIGKILL, timeout_s=5)
        worker.log = worker.log.with_suffix(".restarted.log")
        worker.start()

    def record(self, row: FaultRow) -> None:
        self.table.append(row)


def _worker(name: str, role: str, index: int, model: Path, log_dir: Path) -> Worker:
    port, metrics_port, kv_port = 20100 + index, 20200 + index, 20300 + 10 * index
    if TOY:
        argv = [
            processes.PYTHON, "-m", "tests.chaos.toy_worker",
            "--role", role, "--port", str(port), "--served-model-name", SERVED_NAME,
            "--worker-id", name,
        ]  # fmt: skip
        return Worker(name, role, port, metrics_port, argv, log_dir / f"{name}.log")
    argv = [
        processes.PYTHON, "-m", "pdserve.cli", "worker",
        "--role", role,
        "--model", str(model),
        "--served-model-name", SERVED_NAME,
        "--worker-id", name,
        "--port", str(port),
        "--metrics-port", str(metrics_port),
        "--kv-port", str(kv_port),
        "--max-model-len", str(MAX_MODEL_LEN),
        "--kv-lease-s", "20",
    ]  # fmt: skip
    return Worker(name, role, port, metrics_port, argv, log_dir / f"{name}.log")


@pytest.fixture(scope="session")
def chaos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChaosCluster]:
    model = resolve_model("tiny")
    log_dir = tmp_path_factory.mktemp("chaos")
    workers = {
        w.name: w
        for w in (
            _worker("prefill-0", "prefill", 0, model, log_dir),
            _worker("decode-0", "decode", 1, model, log_dir),
            _worker("decode-1", "decode", 2, model, log_dir),
        )
    }
    router_argv = [
        processes.PYTHON, "-m", "pdserve.cli", "router",
        "--model", str(model),
        "--served-model-name", SERVED_NAME,
        "--prefill", workers["prefill-0"].address,
        "--decode", workers["decode-0"].address,
        "--decode", workers["decode-1"].address,
        "--http-port", str(HTTP_PORT),
        "--grpc-port", str(GRPC_PORT),
        "--health-check-timeout", str(CHECK_TIMEOUT_S),
        "--breaker-failures", str(BREAKER_FAILURES),
        "--breaker-cooldown", str(BREAKER_COOLDOWN_S),
        "--max-in-flight", str(MAX_IN_FLIGHT),
        "--max-queue", str(MAX_QUEUE),
        "--queue-timeout", "60",
    ]  # fmt: skip
    started = time.monotonic()
    for w in workers.values():
        w.start()
    router = processes.start(router_argv, log_dir / "router.log")
    cluster = ChaosCluster(router, workers, log_dir)
    try:
        cluster.wait_healthy({"prefill": 1, "decode": 2}, START_TIMEOUT_S)
        print(f"\nchaos cluster up in {time.monotonic() - started:.0f} s (logs: {log_dir})")
        yield cluster
    finally:
        processes.stop(router)
        for w in workers.values():
            if w.proc is not None:
                with_cont = w.proc.poll() is None
                if with_cont:  # a stopped group ignores SIGTERM until continued
                    os.killpg(w.proc.pid, signal.SIGCONT)
                processes.stop(w.proc, signal.SIGTERM)
        _report(cluster.table, log_dir)


def _report(table: list[FaultRow], log_dir: Path) -> None:
    lines = [
        "| fault injected | requests sent | completed correctly | failed cleanly | lost |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.fault} | {r.sent} | {r.correct} | {r.failed_cleanly} | {r.lost} |" for r in table
    ]
    text = "\n".join(lines)
    print("\n" + text)
    (log_dir / "fault-table.md").write_text(text + "\n")
    (log_dir / "fault-table.json").write_text(json.dumps([r.__dict__ for r in table]))
