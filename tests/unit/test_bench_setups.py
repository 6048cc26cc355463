"""Setup specs, the commands they build, and process-group shutdown (no engines started)."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from pdserve.bench.setups import (
    ManagedProcess,
    SetupContext,
    SetupError,
    SetupSpec,
    build_setup,
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
