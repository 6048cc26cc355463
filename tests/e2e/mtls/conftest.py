"""One 1 prefill + 1 decode cluster on the tiny model, gRPC KV transport, with mutual TLS
on every internal link (router -> workers, decode -> prefill KV), from a throwaway CA, and
per-tenant prefix-cache isolation (router --tenant-isolation, tenants by header; workers
publish KV events for kv_aware routing).

Started as separate `pdserve worker` / `pdserve router` processes (`pdserve up` has no TLS
flags). Start-up cost: about 40-55 s on 2 cores (two eager engines starting together).
Ports 24100-24499.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from pdserve.config import TlsConfig
from tests.e2e import processes
from tests.e2e.conftest import _LIVE_LOG_DIRS, Cluster
from tests.e2e.prompts import MAX_MODEL_LEN, SERVED_NAME
from tests.unit.tls_certs import ThrowawayCa

HTTP_PORT, GRPC_PORT = 24102, 24103
WORKERS = {  # name: (role, Worker API port, metrics port, KV port, health-only port)
    "prefill-0": ("prefill", 24110, 24210, 24310, 24410),
    "decode-0": ("decode", 24111, 24211, 24320, 24411),
}
KV_EVENTS_PORTS = {"prefill-0": 24130, "decode-0": 24140}  # replay: the next port
START_TIMEOUT_S = 600


@dataclass(frozen=True)
class TlsCluster:
    cluster: Cluster
    ca: ThrowawayCa
    router_tls: TlsConfig


def _tls_flags(tls: TlsConfig) -> list[str]:
    return ["--tls-cert", tls.cert, "--tls-key", tls.key, "--tls-ca", tls.ca]


def _wait_pools_healthy(router: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    """/ready needs one path only; these tests need the disaggregated one."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if router.poll() is not None:
            raise RuntimeError(f"router exited:\n{processes.tail(log)}")
        try:
            text = httpx.get(f"http://127.0.0.1:{HTTP_PORT}/metrics", timeout=5).text
        except httpx.HTTPError:
            text = ""
        healthy = [
            line
            for line in text.splitlines()
            if line.startswith("pdserve_router_workers_healthy") and line.endswith(" 1.0")
        ]
        if any("prefill" in h for h in healthy) and any("decode" in h for h in healthy):
            return
        time.sleep(1)
    raise TimeoutError(f"prefill and decode not both healthy after {timeout_s} s")


@pytest.fixture(scope="package")
def tls_cluster(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsCluster]:
    log_dir = tmp_path_factory.mktemp("cluster-mtls")
    _LIVE_LOG_DIRS.append(log_dir)
    ca = ThrowawayCa.create(log_dir / "ca")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for cpu, (name, (role, port, metrics_port, kv_port, health_port)) in enumerate(
            WORKERS.items()
        ):
            argv = [
                processes.PYTHON, "-m", "pdserve.cli", "worker",
                "--role", role,
                "--model", str(tiny_model),
                "--served-model-name", SERVED_NAME,
                "--worker-id", name,
                "--port", str(port),
                "--metrics-port", str(metrics_port),
                "--kv-port", str(kv_port),
                "--kv-transport", "grpc",
                "--max-model-len", str(MAX_MODEL_LEN),
                "--cpu-bind", str(cpu % 2),
                "--health-port", str(health_port),
                "--kv-events-port", str(KV_EVENTS_PORTS[name]),
                *_tls_flags(ca.issue(name)),
            ]  # fmt: skip
            procs.append(
                processes.start(argv, log_dir / f"{name}.log", env={"VLLM_CPU_KVCACHE_SPACE": "1"})
            )
        router_tls = ca.issue("router")
        router_argv = [
            processes.PYTHON, "-m", "pdserve.cli", "router",
            "--model", str(tiny_model),
            "--served-model-name", SERVED_NAME,
            "--prefill", f"127.0.0.1:{WORKERS['prefill-0'][1]}",
            "--decode", f"127.0.0.1:{WORKERS['decode-0'][1]}",
            "--http-port", str(HTTP_PORT),
            "--grpc-port", str(GRPC_PORT),
            "--tenant-isolation",
            *_tls_flags(router_tls),
        ]  # fmt: skip
        router = processes.start(router_argv, log_dir / "router.log")
        procs.append(router)
        _wait_pools_healthy(router, log_dir / "router.log", START_TIMEOUT_S)
        metrics_ports = {name: spec[2] for name, spec in WORKERS.items()}
        cluster = Cluster(
            f"http://127.0.0.1:{HTTP_PORT}",
            f"127.0.0.1:{GRPC_PORT}",
            metrics_ports,
            router.pid,
            log_dir / "router.log",
        )
        yield TlsCluster(cluster, ca, router_tls)
    finally:
        for proc in reversed(procs):
            processes.stop(proc, signal.SIGTERM, timeout_s=40)
