"""Setup specs, the commands they build, and process-group shutdown (no engines started)."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from pdserve.bench.prefix_cache import EngineEndpoint, EngineRole
from pdserve.bench.setups import (
    ManagedProcess,
    SetupContext,
    SetupError,
    SetupSpec,
    build_setup,
    cpu_split,
    pdserve_engines,
    split_workers,
    wait_ready,
)
from pdserve.errors import ConfigError


def ctx(tmp_path: Path) -> SetupContext:
    return SetupContext(
        model_path=tmp_path / "model", served_name="m", log_dir=tmp_path / "logs", cpus=(0, 1)
    )


def test_spec_parsing() -> None:
    assert SetupSpec.parse("vllm") == SetupSpec("vllm", "vllm")
    spec = SetupSpec.parse("colo=pdserve:--both 1 --prefill 0 --decode 0")
    assert (spec.label, spec.kind) == ("colo", "pdserve")
    assert spec.extra_args == ("--both", "1", "--prefill", "0", "--decode", "0")
    assert SetupSpec.attach("mine=http://127.0.0.1:8000/").url == "http://127.0.0.1:8000"
    for bad in ("sglang", "x=attach", "x=vllm-router"):
        with pytest.raises(ConfigError):
            SetupSpec.parse(bad)
    for bad in ("http://x", "a=ftp://x", "=http://x"):
        with pytest.raises(ConfigError):
            SetupSpec.attach(bad)


def test_commands_use_separate_port_blocks(tmp_path: Path) -> None:
    c = ctx(tmp_path)
    vllm = build_setup(SetupSpec.parse("vllm"), c, 0)
    assert vllm.url == "http://127.0.0.1:18000"
    (server,) = vllm.stages[0]
    assert server.argv[server.argv.index("--port") + 1] == "18000"
    assert "--enforce-eager" in server.argv and server.env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    pd = build_setup(SetupSpec.parse("vllm-pd"), c, 1)
    prefill, decode = pd.stages[0]
    (router,) = pd.stages[1]
    assert pd.url == "http://127.0.0.1:18020"
    assert prefill.env["VLLM_CPU_OMP_THREADS_BIND"] == "0"
    assert decode.env["VLLM_CPU_OMP_THREADS_BIND"] == "1"
    sides = {prefill.env["VLLM_NIXL_SIDE_CHANNEL_PORT"], decode.env["VLLM_NIXL_SIDE_CHANNEL_PORT"]}
    assert sides == {"18620", "18625"}
    assert "--vllm-pd-disaggregation" in router.argv
    assert "http://127.0.0.1:18021" in router.argv and "http://127.0.0.1:18022" in router.argv
    up = build_setup(SetupSpec.parse("pdserve:--prefill 2"), c, 2)
    (proc,) = up.stages[0]
    assert up.url == "http://127.0.0.1:18040"
    assert proc.argv[-2:] == ["--prefill", "2"]  # user flags come last and win
    assert proc.argv[proc.argv.index("--http-port") + 1] == "18040"


def _value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_vllm_dp_spec_takes_workers_and_passes_the_rest_to_vllm_router() -> None:
    spec = SetupSpec.parse("vr=vllm-dp:--workers 3 --policy cache_aware")
    assert (spec.label, spec.kind) == ("vr", "vllm-dp")
    assert split_workers(spec.extra_args) == (3, ["--policy", "cache_aware"])
    assert split_workers(["--policy", "round_robin"]) == (2, ["--policy", "round_robin"])
    assert split_workers(["--workers=4", "--workers", "1"]) == (1, [])  # the last one wins
    for bad in (["--workers"], ["--workers", "two"], ["--workers", "0"], ["--workers=19"]):
        with pytest.raises(ConfigError):
            split_workers(bad)


def test_vllm_dp_servers_split_the_cpus_behind_vllm_router(tmp_path: Path) -> None:
    c = SetupContext(
        model_path=tmp_path / "model", served_name="m", log_dir=tmp_path / "logs",
        cpus=(0, 1, 2, 3), kv_cache_gib=2, max_model_len=1536,
    )  # fmt: skip
    dp = build_setup(SetupSpec.parse("vr=vllm-dp:--workers 2 --policy cache_aware"), c, 1)
    servers = dp.stages[0]
    (router,) = dp.stages[1]
    assert dp.url == "http://127.0.0.1:18020"
    assert [s.env["VLLM_CPU_OMP_THREADS_BIND"] for s in servers] == ["0-1", "2-3"]
    plain = build_setup(SetupSpec.parse("vllm"), c, 0).stages[0][0]
    for i, server in enumerate(servers):
        # The same flags as the single plain server, only the port differs.
        assert _value(server.argv, "--port") == str(18021 + i)
        assert (
            server.argv[: server.argv.index("--port")] == plain.argv[: plain.argv.index("--port")]
        )
        assert _value(server.argv, "--max-model-len") == "1536"
        assert server.env["VLLM_CPU_KVCACHE_SPACE"] == "2"
        assert server.ready_url == f"http://127.0.0.1:{18021 + i}"
        assert server.log_path == tmp_path / "logs" / "vr" / f"server-{i}.log"
    urls = ["http://127.0.0.1:18021", "http://127.0.0.1:18022"]
    start = router.argv.index("--worker-urls")
    assert router.argv[start + 1 : start + 3] == urls
    assert _value(router.argv, "--port") == "18020"
    assert router.argv[-2:] == ["--policy", "cache_aware"]
    assert "--workers" not in router.argv and "--vllm-pd-disaggregation" not in router.argv
    assert router.ready_url is None  # waited for through the front door once servers are up
    assert dp.engines == [
        EngineEndpoint("server-0", urls[0] + "/metrics"),
        EngineEndpoint("server-1", urls[1] + "/metrics"),
    ]
    described = dp.describe()
    assert [e["role"] for e in described["engines"]] == ["serving", "serving"]


def test_cpu_split() -> None:
    assert cpu_split((0, 1), 2) == [(0,), (1,)]
    assert cpu_split((0, 1, 2), 2) == [(0,), (1, 2)]  # as the P/D halves: decode gets more
    assert cpu_split((4, 5, 6, 7, 8), 3) == [(4,), (5, 6), (7, 8)]
    assert cpu_split((0, 1), 3) == [(0,), (1,), (0,)]  # more servers than CPUs: they share
    assert cpu_split((3,), 2) == [(3,), (3,)]


def test_every_setup_names_its_engines_metrics(tmp_path: Path) -> None:
    c = ctx(tmp_path)
    (vllm,) = build_setup(SetupSpec.parse("vllm"), c, 0).engines
    assert vllm == EngineEndpoint("vllm", "http://127.0.0.1:18000/metrics")
    prefill, decode = build_setup(SetupSpec.parse("vllm-pd"), c, 1).engines
    assert prefill == EngineEndpoint(
        "prefill", "http://127.0.0.1:18021/metrics", EngineRole.PREFILL
    )
    assert decode == EngineEndpoint("decode", "http://127.0.0.1:18022/metrics")
    # pdserve: metrics ports from the base (base + 10 in a setup) by launcher slot.
    up = build_setup(SetupSpec.parse("pdserve:--prefill 1 --decode 2"), c, 2)
    assert [(e.name, e.url, e.role) for e in up.engines] == [
        ("prefill-0", "http://127.0.0.1:18050/metrics", EngineRole.PREFILL),
        ("decode-0", "http://127.0.0.1:18051/metrics", EngineRole.SERVING),
        ("decode-1", "http://127.0.0.1:18052/metrics", EngineRole.SERVING),
    ]
    colocated = build_setup(SetupSpec.parse("pdserve:--both 2 --prefill 0 --decode 0"), c, 0)
    assert [(e.name, e.url) for e in colocated.engines] == [
        ("both-0", "http://127.0.0.1:18010/metrics"),
        ("both-1", "http://127.0.0.1:18011/metrics"),
    ]
    assert all(e.role is EngineRole.SERVING for e in colocated.engines)
    assert build_setup(SetupSpec.attach("x=http://h:1"), c, 3).engines == []


def test_pdserve_engines_follow_the_launcher_layout() -> None:
    from pdserve.config import ClusterConfig, PoolConfig
    from pdserve.deploy.local.launcher import plan_components

    config = ClusterConfig(
        model="m", prefill=PoolConfig(replicas=2), decode=PoolConfig(replicas=1),
        both=PoolConfig(replicas=1), metrics_base_port=9300,
    )  # fmt: skip
    workers, _ = plan_components(config, Path("/m"), Path("/logs"))
    launched = [(w.name, int(_value(w.argv, "--metrics-port"))) for w in workers]
    argv = ["up", "--prefill", "1", "--decode", "1", "--metrics-base-port", "9100",
            "--prefill", "2", "--both=1", "--metrics-base-port=9300"]  # fmt: skip
    engines = pdserve_engines(argv)
    assert [(e.name, int(e.url.split(":")[2].split("/")[0])) for e in engines] == launched
    assert [e.role for e in engines] == [EngineRole.PREFILL] * 2 + [EngineRole.SERVING] * 2
    with pytest.raises(ConfigError):
        pdserve_engines(["--decode", "many"])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


def test_stop_kills_the_whole_group_even_when_sigint_is_ignored(tmp_path: Path) -> None:
    child_pid_file = tmp_path / "child.pid"
    script = (
        "import os, signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "child = subprocess.Popen([sys.executable, '-c', "
        "'import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(60)'])\n"
        f"open({str(child_pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(60)\n"
    )
    proc = ManagedProcess("stubborn", [sys.executable, "-c", script], {}, tmp_path / "p.log")
    proc.start()
    deadline = time.monotonic() + 20
    while not child_pid_file.exists() or not child_pid_file.read_text():
        assert time.monotonic() < deadline, proc.log_tail()
        time.sleep(0.05)
    child = int(child_pid_file.read_text())
    assert proc.alive() and _alive(child)
    started = time.monotonic()
    proc.stop(timeout_s=0.5)
    assert time.monotonic() - started < 5
    assert not proc.alive()
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)
    assert proc.proc is not None and proc.proc.returncode == -signal.SIGKILL


def test_wait_ready_reports_a_dead_process(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "print('bad flag'); raise SystemExit(3)"]
    proc = ManagedProcess("dies", argv, {}, tmp_path / "d.log")
    proc.start()
    with pytest.raises(SetupError, match="exited before it was ready") as err:
        wait_ready("http://127.0.0.1:9", "m", time.monotonic() + 20, [proc])
    assert "bad flag" in err.value.message
    proc.stop(1.0)
    with pytest.raises(SetupError, match="not ready"):
        wait_ready("http://127.0.0.1:9", "m", time.monotonic() + 0.5)
