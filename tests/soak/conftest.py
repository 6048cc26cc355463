"""One small cluster of real processes for the API fuzzing and soak tests: a real
`pdserve router` (tiny model's tokenizer) in front of toy workers (tests/chaos/toy_worker.py:
real gRPC processes, no engine), 1 prefill + 1 decode. Ports 24000-24099. Start-up: a few
seconds (the router loading its tokenizer)."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest

from pdserve.models import resolve_model
from pdserve.v1 import worker_pb2 as pb
from pdserve.v1 import worker_pb2_grpc
from tests.e2e import processes
from tests.e2e.prompts import SERVED_NAME

HTTP_PORT, GRPC_PORT = 24000, 24001
WORKER_PORTS = {"prefill-0": 24010, "decode-0": 24011}
ROUTER = f"http://127.0.0.1:{HTTP_PORT}"
MAX_IN_FLIGHT = 16
MAX_QUEUE = 16
START_TIMEOUT_S = 120
# Per token: a request without max_tokens (up to ~500 tokens) streams in about a second.
TOKEN_DELAY_S = 0.002


@dataclass
class ToyCluster:
    router: subprocess.Popen[bytes]
    workers: dict[str, subprocess.Popen[bytes]]
    log_dir: Path

    @property
    def url(self) -> str:
        return ROUTER

    def router_metric(self, name: str) -> float:
        """Sum of the router's samples of ``name`` (all label sets)."""
        text = httpx.get(f"{ROUTER}/metrics", timeout=10).text
        pattern = re.compile(rf"^{re.escape(name)}(?:\{{.*\}})? (\S+)$")
        return sum(float(m.group(1)) for line in text.splitlines() if (m := pattern.match(line)))

    def worker_running(self) -> dict[str, int]:
        """Requests each worker is running now, by its own account (GetLoad)."""
        out = {}
        for name, port in WORKER_PORTS.items():
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                load = worker_pb2_grpc.WorkerStub(channel).GetLoad(pb.GetLoadRequest(), timeout=5)
            out[name] = int(load.running_requests)
        return out

    def check_alive(self) -> None:
        for name, proc in {"router": self.router, **self.workers}.items():
            if proc.poll() is not None:
                log = self.log_dir / f"{name}.log"
                raise RuntimeError(f"{name} exited {proc.returncode}:\n{processes.tail(log)}")


@pytest.fixture(scope="package")
def toy_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ToyCluster]:
    log_dir = tmp_path_factory.mktemp("soak")
    workers: dict[str, subprocess.Popen[bytes]] = {}
    router: subprocess.Popen[bytes] | None = None
    try:
        for name, port in WORKER_PORTS.items():
            argv = [
                processes.PYTHON, "-m", "tests.chaos.toy_worker",
                "--role", name.split("-")[0], "--port", str(port),
                "--served-model-name", SERVED_NAME, "--worker-id", name,
                "--token-delay-s", str(TOKEN_DELAY_S),
            ]  # fmt: skip
            workers[name] = processes.start(argv, log_dir / f"{name}.log")
        router_argv = [
            processes.PYTHON, "-m", "pdserve.cli", "router",
            "--model", str(resolve_model("tiny")),
            "--served-model-name", SERVED_NAME,
            "--prefill", f"127.0.0.1:{WORKER_PORTS['prefill-0']}",
            "--decode", f"127.0.0.1:{WORKER_PORTS['decode-0']}",
            "--http-port", str(HTTP_PORT),
            "--grpc-port", str(GRPC_PORT),
            "--max-in-flight", str(MAX_IN_FLIGHT),
            "--max-queue", str(MAX_QUEUE),
            "--log-level", "warning",
        ]  # fmt: skip
        router = processes.start(router_argv, log_dir / "router.log")
        processes.wait_http_ok(f"{ROUTER}/ready", router, log_dir / "router.log", START_TIMEOUT_S)
        cluster = ToyCluster(router, workers, log_dir)
        cluster.check_alive()
        yield cluster
    finally:
        if router is not None:
            processes.stop(router, signal.SIGTERM, timeout_s=20)
        for proc in workers.values():
            processes.stop(proc, signal.SIGTERM, timeout_s=20)


@pytest.fixture
def settle(toy_cluster: ToyCluster) -> Iterator[None]:
    """After a test: the cluster is idle again (a slow test left nothing running)."""
    yield
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and toy_cluster.router_metric(
        "pdserve_router_requests_in_flight"
    ):
        time.sleep(0.2)
