"""`pdserve up --backend ray` on a local Ray cluster: 1P+1D comes up with every worker
under a Ray actor, serves token-identically to plain vLLM, and `pdserve scale
--ray-address` (the Ray scaler, through the cluster's registry actor) takes decode
1 -> 2 under load and back with no failed request; Ctrl-C leaves no worker process and
no pdserve actor behind.

Cost on 2 cores: Ray's head (about 10 s), the cluster's two engines (about 85-150 s), a
third engine started under load and its drain; about 4-6 minutes in all.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e import processes
from tests.e2e.conftest import Reference, run_cluster
from tests.e2e.ray.conftest import RAY_ADDRESS, RayHead
from tests.e2e.scaling.test_scale_local import Load, wait_count, worker_requests

pytestmark = pytest.mark.e2e

BASE_PORT = 25000
CONTROL_PORT = BASE_PORT + 52  # run_cluster's --control-port
METRICS_BASE_PORT = BASE_PORT + 200
NAMESPACE = "pdserve-e2e"


def scale(head: RayHead, role: str, replicas: int) -> str:
    """`pdserve scale` through Ray, as a user on any node of the Ray cluster runs it."""
    result = subprocess.run(
        [processes.PYTHON, "-m", "pdserve.cli", "scale", role, str(replicas),
         "--ray-address", RAY_ADDRESS, "--ray-namespace", NAMESPACE, "--timeout-s", "600"],
        capture_output=True, text=True, timeout=660, env={**os.environ, **head.env},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def pools() -> dict[str, dict[str, object]]:
    reply = httpx.get(f"http://127.0.0.1:{CONTROL_PORT}/v1/pools", timeout=10).json()
    return reply["pools"]  # type: ignore[no-any-return]


def named_actors(head: RayHead) -> list[str]:
    """The live named actors of the cluster's namespace, asked from a fresh Ray driver."""
    script = (
        "import json, ray; "
        f"ray.init(address={RAY_ADDRESS!r}, namespace={NAMESPACE!r}, log_to_driver=False); "
        "print(json.dumps(sorted(ray.util.list_named_actors())))"
    )
    result = subprocess.run(
        [processes.PYTHON, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **head.env},
    )
    assert result.returncode == 0, result.stderr
    names = json.loads(result.stdout.strip().splitlines()[-1])
    assert isinstance(names, list)
    return names


def worker_processes(root_pid: int) -> list[int]:
    return [
        pid for pid in processes.descendants(root_pid) if b"pdserve.cli\x00worker" in _cmdline(pid)
    ]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_ray_cluster_serves_and_scales_decode_without_failures(
    ray_head: RayHead,
    tiny_model: Path,
    reference: Reference,
    tmp_path: Path,
) -> None:
    started = time.monotonic()
    extra = [
        "--backend", "ray", "--ray-address", RAY_ADDRESS, "--ray-namespace", NAMESPACE,
        "--prefill", "1", "--decode", "1", "--policy", "round_robin",
    ]  # fmt: skip
    up = contextlib.contextmanager(run_cluster)
    with up(tiny_model, tmp_path / "logs", BASE_PORT, extra, 600, ray_head.env) as cluster:
        print(f"ray cluster ready after {time.monotonic() - started:.0f} s")
        # Every worker runs under a Ray actor, as a child of Ray's worker process.
        assert len(worker_processes(ray_head.proc.pid)) == 2
        assert "pdserve-worker-decode-0" in named_actors(ray_head)
        with Load(cluster) as load:
            wait_count(load, 4)
            assert "decode 2" in scale(ray_head, "decode", 2)
            workers = pools()["decode"]["workers"]
            assert [w["state"] for w in workers] == ["serving", "serving"]  # type: ignore[index]
            assert "pdserve-worker-decode-1" in named_actors(ray_head)
            new_worker_metrics = METRICS_BASE_PORT + 2  # slot 2 (prefill-0: 0, decode-0: 1)
            served_before = worker_requests(new_worker_metrics)
            deadline = time.monotonic() + 120
            while worker_requests(new_worker_metrics) < served_before + 3:
                assert time.monotonic() < deadline, "the new decode worker got no requests"
                time.sleep(0.5)
            during = load.count()
            assert "decode 1" in scale(ray_head, "decode", 1)
            wait_count(load, during + 4)
        assert [w["name"] for w in pools()["decode"]["workers"]] == ["decode-0"]  # type: ignore[index]
        assert "pdserve-worker-decode-1" not in named_actors(ray_head)
        log = cluster.log.read_text()
    print(f"ray test done after {time.monotonic() - started:.0f} s")
    assert not load.errors, load.errors
    assert len(load.answers) >= 12
    for case, answer in load.answers:
        assert answer == reference.completions[case], case
    assert "decode-1 drained by the router; stopping it" in log
    # Ctrl-C on `pdserve up`: the actors are gone and no worker process is left.
    assert named_actors(ray_head) == []
    assert worker_processes(ray_head.proc.pid) == []
