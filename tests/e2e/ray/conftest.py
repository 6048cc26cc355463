"""A local Ray cluster (`ray start --head`) for the Ray backend's end-to-end test.

Ports: 25000-25999 (cluster: HTTP 25000, gRPC 25051, control 25052, workers 25100+,
metrics 25200+, KV 25600+; Ray: GCS 25300, its agents 25301-25309, its worker processes
25400-25499). Ray gets 4 logical CPUs (one per worker engine rank: 1P + 2D, and one
spare) on this 2-core machine; start-up costs about 10 s of CPU.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e import processes

RAY_GCS_PORT = 25300
RAY_ADDRESS = f"127.0.0.1:{RAY_GCS_PORT}"
RAY_CPUS = 4
START_TIMEOUT_S = 120.0


def ray_head_argv(temp_dir: Path) -> list[str]:
    ray = str(Path(processes.PYTHON).with_name("ray"))
    return [
        ray, "start", "--head", "--block",
        "--node-ip-address", "127.0.0.1",
        "--port", str(RAY_GCS_PORT),
        "--node-manager-port", "25301",
        "--object-manager-port", "25302",
        "--ray-client-server-port", "25303",
        "--dashboard-agent-listen-port", "25304",
        "--dashboard-agent-grpc-port", "25305",
        "--metrics-export-port", "25306",
        "--runtime-env-agent-port", "25307",
        "--min-worker-port", "25400",
        "--max-worker-port", "25499",
        "--include-dashboard", "false",
        "--num-cpus", str(RAY_CPUS),
        "--temp-dir", str(temp_dir),
        "--disable-usage-stats",
    ]  # fmt: skip


def _gcs_open() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", RAY_GCS_PORT), timeout=1):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class RayHead:
    proc: subprocess.Popen[bytes]
    # What every process joining it needs: `ray start` (2.60) requires token
    # authentication, and a joining driver sends its token only in token mode.
    env: dict[str, str]


@pytest.fixture(scope="package")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayHead]:
    """`ray start --head --block` in its own process group, with a token of its own; on
    exit the whole group (GCS, raylet, Ray's worker processes) is stopped, SIGKILL after
    20 s."""
    log_dir = tmp_path_factory.mktemp("ray-head")
    token = log_dir / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    # Ray's session folder holds Unix sockets: keep its path short.
    temp_dir = Path(f"/tmp/pdserve-ray-{os.getpid()}")
    proc = processes.start(ray_head_argv(temp_dir), log_dir / "ray.log", env)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _gcs_open():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start --head failed:\n{processes.tail(log_dir / 'ray.log')}")
            time.sleep(0.5)
        yield RayHead(proc, env)
    finally:
        processes.stop(proc, sig=signal.SIGTERM, timeout_s=20)
        subprocess.run(["rm", "-rf", str(temp_dir)], check=False)
