"""Serving setups that ``pdserve bench compare`` starts, waits for, and stops.

Each process runs in its own process group (session), is waited on by polling its HTTP
API, and is stopped with SIGINT to the whole group, then SIGKILL after a timeout, so
nothing it spawned (engine cores, workers) outlives the benchmark.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

from pdserve.bench.prefix_cache import EngineEndpoint, EngineRole
from pdserve.errors import ConfigError, PdserveError

KINDS = ("vllm", "vllm-pd", "vllm-dp", "pdserve", "attach")
DEFAULT_SETUPS = ("vllm", "vllm-pd", "pdserve")
_PORTS_PER_SETUP = 20
# NIXL side channels: a pdserve worker takes 8 (deploy/local/launcher.py), a 1P1D setup 16.
_SIDE_PORTS_PER_SETUP = 20
_DP_DEFAULT_WORKERS = 2
_DP_MAX_WORKERS = _PORTS_PER_SETUP - 2  # the router's port and its Prometheus port
_NIXL_KV = {"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_buffer_device": "cpu"}


class SetupError(PdserveError):
    """A setup could not be started or did not become ready."""


@dataclass(frozen=True)
class SetupSpec:
    """``[LABEL=]KIND[:EXTRA ARGS]`` for a started setup, or ``LABEL=URL`` to attach."""

    label: str
    kind: str
    extra_args: tuple[str, ...] = ()
    url: str | None = None

    @classmethod
    def parse(cls, text: str) -> SetupSpec:
        label, sep, rest = text.partition("=")
        if not sep:
            label, rest = "", text
        kind, _, args = rest.partition(":")
        if kind not in KINDS or kind == "attach":
            raise ConfigError(
                f"unknown setup {text!r}: use [LABEL=]{{vllm|vllm-pd|vllm-dp|pdserve}}[:ARGS]"
            )
        return cls(label.strip() or kind, kind, tuple(shlex.split(args)))

    @classmethod
    def attach(cls, text: str) -> SetupSpec:
        label, sep, url = text.partition("=")
        if not sep or not label or not url.startswith(("http://", "https://")):
            raise ConfigError(f"bad --attach {text!r}: use NAME=http://host:port")
        return cls(label, "attach", url=url.rstrip("/"))


@dataclass(frozen=True)
class SetupContext:
    """What every started setup shares: the model, ports, CPUs and where logs go."""

    model_path: Path
    served_name: str
    log_dir: Path
    port_base: int = 18000
    side_channel_base: int = 18600
    max_model_len: int = 2048
    kv_cache_gib: int = 1
    python: str = sys.executable
    cpus: tuple[int, ...] = field(default_factory=lambda: tuple(sorted(os.sched_getaffinity(0))))


@dataclass
class ManagedProcess:
    """One child process in its own process group, with its output in a log file."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    ready_url: str | None = None
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float) -> None:
        """SIGINT to the group, SIGKILL to whatever of the group remains after the timeout."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session made the child its group's leader
        if self.proc.poll() is None:
            _signal_group(pgid, signal.SIGINT)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                _signal_group(pgid, signal.SIGKILL)
                self.proc.wait(timeout_s)
        # Children that ignored SIGINT or outlived the leader: the group id stays reserved
        # while any member lives, so this reaches only our own processes.
        _signal_group(pgid, signal.SIGKILL)
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        if self.proc is not None:
            _signal_group(self.proc.pid, signal.SIGKILL)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


@dataclass
class Setup:
    """A serving setup: stages of processes started in order, and the URL to benchmark."""

    spec: SetupSpec
    url: str
    stages: list[list[ManagedProcess]] = field(default_factory=list)
    engines: list[EngineEndpoint] = field(default_factory=list)
    """The engines' /metrics endpoints, for their prefix-cache counters."""

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.spec.kind,
            "url": self.url,
            "engines": [e.to_json() for e in self.engines],
            "processes": [
                {"name": p.name, "argv": p.argv, "env": p.env, "log": str(p.log_path)}
                for stage in self.stages
                for p in stage
            ],
        }

    def start(self, model: str, timeout_s: float) -> None:
        """Start stage by stage; each stage's processes must answer before the next starts."""
        deadline = time.monotonic() + timeout_s
        for stage in self.stages:
            for process in stage:
                process.start()
            for process in stage:
                if process.ready_url is not None:
                    wait_ready(process.ready_url, model, deadline, [process])
        every = [p for stage in self.stages for p in stage]
        if every:
            wait_ready(self.url, model, deadline, every, probe=True)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the last stage first (the router before its workers)."""
        every = [p for stage in self.stages for p in stage]
        try:
            for process in reversed(every):
                process.stop(timeout_s)
        except KeyboardInterrupt:
            for process in every:  # a second Ctrl-C: no more patience, but no orphans
                process.kill()
            raise


def wait_ready(
    url: str,
    model: str,
    deadline: float,
    watch: Sequence[ManagedProcess] = (),
    probe: bool = False,
) -> None:
    """Poll ``/v1/models`` (and ``/ready`` where it exists; and one tiny completion if
    ``probe``) until they answer, a watched process dies, or the deadline passes."""
    last = "no answer yet"
    with httpx.Client(timeout=30.0, trust_env=False) as http:
        while time.monotonic() < deadline:
            for process in watch:
                if not process.alive():
                    raise SetupError(
                        f"{process.name} exited before it was ready; log {process.log_path}:\n"
                        + process.log_tail()
                    )
            try:
                last = _check(http, url, model, probe)
                if not last:
                    return
            except httpx.HTTPError as e:
                last = f"{type(e).__name__}: {e}"
            time.sleep(1.0)
    raise SetupError(f"{url} not ready before the start-up timeout ({last})")


def _check(http: httpx.Client, url: str, model: str, probe: bool) -> str:
    """An empty string when ready, else why not."""
    models = http.get(url + "/v1/models")
    if models.status_code != 200 or not models.json().get("data"):
        return f"/v1/models answered {models.status_code}"
    ready = http.get(url + "/ready")
    if ready.status_code >= 500:  # 4xx: no such endpoint here (vLLM 404, vllm-router 405)
        return f"/ready answered {ready.status_code}"
    if probe:
        body = {"model": model, "prompt": " hello", "max_tokens": 1, "temperature": 0}
        resp = http.post(url + "/v1/completions", json=body)
        if resp.status_code != 200:
            return f"probe completion answered {resp.status_code}: {resp.text[:200]}"
    return ""


def build_setup(spec: SetupSpec, ctx: SetupContext, index: int) -> Setup:
    """The processes for ``spec``; ``index`` picks a port block no other setup uses."""
    if spec.kind == "attach":
        assert spec.url is not None  # SetupSpec.attach guarantees it
        return Setup(spec, spec.url)
    base = ctx.port_base + index * _PORTS_PER_SETUP
    side = ctx.side_channel_base + index * _SIDE_PORTS_PER_SETUP
    logs = ctx.log_dir / spec.label
    if spec.kind == "vllm":
        server = _vllm_server(ctx, "vllm", base, logs, list(spec.extra_args), {})
        return Setup(spec, server.ready_url or "", [[server]], [_engine(server)])
    if spec.kind == "vllm-pd":
        return _vllm_pd(spec, ctx, base, side, logs)
    if spec.kind == "vllm-dp":
        return _vllm_dp(spec, ctx, base, logs)
    return _pdserve(spec, ctx, base, side, logs)


def _vllm_server(
    ctx: SetupContext, name: str, port: int, logs: Path, extra: list[str], env: dict[str, str]
) -> ManagedProcess:
    argv = [
        ctx.python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(ctx.model_path), "--served-model-name", ctx.served_name,
        "--dtype", "float32", "--max-model-len", str(ctx.max_model_len), "--enforce-eager",
        "--host", "127.0.0.1", "--port", str(port), *extra,
    ]  # fmt: skip
    env = {"VLLM_CPU_KVCACHE_SPACE": str(ctx.kv_cache_gib), **env}
    url = f"http://127.0.0.1:{port}"
    return ManagedProcess(name, argv, env, logs / f"{name}.log", ready_url=url)


def _engine(server: ManagedProcess, role: EngineRole = EngineRole.SERVING) -> EngineEndpoint:
    """A vLLM OpenAI server serves its Prometheus metrics on its own port."""
    return EngineEndpoint(server.name, f"{server.ready_url}/metrics", role)


def _cpu_halves(cpus: tuple[int, ...]) -> tuple[str, str]:
    """Prefill gets the first half of the CPUs, decode the rest (both share one if alone)."""
    first, second = _cpu_split(cpus, 2)
    return first, second


def cpu_split(cpus: tuple[int, ...], parts: int) -> list[tuple[int, ...]]:
    """``parts`` contiguous, near-equal shares of ``cpus`` (the last ones get the extra
    CPUs, as decode did in the P/D halves); with fewer CPUs than parts, the parts take
    the CPUs in turn and share them."""
    if len(cpus) < parts:
        return [(cpus[i % len(cpus)],) for i in range(parts)]
    size, extra = divmod(len(cpus), parts)
    shares, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i >= parts - extra else 0)
        shares.append(cpus[start:end])
        start = end
    return shares


def _cpu_split(cpus: tuple[int, ...], parts: int) -> list[str]:
    return [_cpu_list(share) for share in cpu_split(cpus, parts)]


def _cpu_list(cpus: tuple[int, ...]) -> str:
    if list(cpus) == list(range(cpus[0], cpus[-1] + 1)):
        return str(cpus[0]) if len(cpus) == 1 else f"{cpus[0]}-{cpus[-1]}"
    return ",".join(str(c) for c in cpus)


def _router_bin(ctx: SetupContext, kind: str) -> str:
    found = shutil.which("vllm-router", path=str(Path(ctx.python).parent)) or shutil.which(
        "vllm-router"
    )
    if found is None:
        raise ConfigError(f"the {kind} setup needs vllm-router: pip install vllm-router")
    return found


def _vllm_pd(spec: SetupSpec, ctx: SetupContext, base: int, side: int, logs: Path) -> Setup:
    router_bin = _router_bin(ctx, "vllm-pd")
    kv = ["--kv-transfer-config", json.dumps(_NIXL_KV)]
    prefill_cpus, decode_cpus = _cpu_halves(ctx.cpus)
    prefill = _vllm_server(
        ctx, "prefill", base + 1, logs, kv,
        {"VLLM_CPU_OMP_THREADS_BIND": prefill_cpus, "VLLM_NIXL_SIDE_CHANNEL_PORT": str(side),
         "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1"},
    )  # fmt: skip
    decode = _vllm_server(
        ctx, "decode", base + 2, logs, kv,
        {"VLLM_CPU_OMP_THREADS_BIND": decode_cpus, "VLLM_NIXL_SIDE_CHANNEL_PORT": str(side + 5),
         "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1"},
    )  # fmt: skip
    router_port = base
    router_argv = [
        router_bin, "--host", "127.0.0.1", "--port", str(router_port),
        "--vllm-pd-disaggregation",
        "--prefill", f"http://127.0.0.1:{base + 1}", "--decode", f"http://127.0.0.1:{base + 2}",
        "--prometheus-port", str(base + 3), "--worker-startup-check-interval", "1",
        *spec.extra_args,
    ]  # fmt: skip
    router = ManagedProcess("vllm-router", router_argv, {}, logs / "vllm-router.log")
    engines = [_engine(prefill, EngineRole.PREFILL), _engine(decode)]
    return Setup(spec, f"http://127.0.0.1:{router_port}", [[prefill, decode], [router]], engines)


def split_workers(args: Sequence[str]) -> tuple[int, list[str]]:
    """``--workers N`` (or ``--workers=N``; the last one wins) out of a vllm-dp spec's
    arguments, and the rest, which go to vllm-router."""
    workers, rest = _DP_DEFAULT_WORKERS, []
    items = list(args)
    i = 0
    while i < len(items):
        arg = items[i]
        if arg == "--workers" or arg.startswith("--workers="):
            if "=" in arg:
                value = arg.split("=", 1)[1]
            elif i + 1 < len(items):
                value = items[i + 1]
                i += 1
            else:
                raise ConfigError("vllm-dp: --workers needs a number")
            try:
                workers = int(value)
            except ValueError:
                raise ConfigError(f"vllm-dp: --workers {value!r} is not a number") from None
        else:
            rest.append(arg)
        i += 1
    if not 1 <= workers <= _DP_MAX_WORKERS:
        raise ConfigError(f"vllm-dp: --workers must be 1..{_DP_MAX_WORKERS}, got {workers}")
    return workers, rest


def _vllm_dp(spec: SetupSpec, ctx: SetupContext, base: int, logs: Path) -> Setup:
    """N plain vLLM servers, the CPUs split between them, behind vllm-router (its own
    policy: ``cache_aware`` unless the spec's arguments say otherwise)."""
    router_bin = _router_bin(ctx, "vllm-dp")
    workers, router_args = split_workers(spec.extra_args)
    servers = [
        _vllm_server(
            ctx, f"server-{i}", base + 1 + i, logs, [], {"VLLM_CPU_OMP_THREADS_BIND": cpus}
        )
        for i, cpus in enumerate(_cpu_split(ctx.cpus, workers))
    ]
    router_argv = [
        router_bin, "--host", "127.0.0.1", "--port", str(base),
        "--worker-urls", *(s.ready_url or "" for s in servers),
        "--prometheus-port", str(base + _PORTS_PER_SETUP - 1),
        "--worker-startup-check-interval", "1",
        *router_args,
    ]  # fmt: skip
    router = ManagedProcess("vllm-router", router_argv, {}, logs / "vllm-router.log")
    engines = [_engine(s) for s in servers]
    return Setup(spec, f"http://127.0.0.1:{base}", [servers, [router]], engines)


def _pdserve(spec: SetupSpec, ctx: SetupContext, base: int, side: int, logs: Path) -> Setup:
    # Flags given in the spec come last, so they override these defaults (click keeps
    # the last value of a repeated option).
    argv = [
        ctx.python, "-m", "pdserve.cli", "up",
        "--model", str(ctx.model_path), "--served-model-name", ctx.served_name,
        "--prefill", "1", "--decode", "1",
        "--http-port", str(base), "--grpc-port", str(base + 1),
        "--worker-base-port", str(base + 2), "--metrics-base-port", str(base + 10),
        "--kv-base-port", str(side), "--control-port", str(base + 19),
        "--max-model-len", str(ctx.max_model_len),
        "--log-dir", str(logs / "cluster"), *spec.extra_args,
    ]  # fmt: skip
    up = ManagedProcess("pdserve-up", argv, {}, logs / "pdserve-up.log")
    return Setup(spec, f"http://127.0.0.1:{base}", [[up]], pdserve_engines(argv))


def _last_value(argv: Sequence[str], flag: str) -> str | None:
    """The value of the last ``flag VALUE`` or ``flag=VALUE`` (click keeps the last)."""
    value = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def pdserve_engines(argv: Sequence[str]) -> list[EngineEndpoint]:
    """The workers ``pdserve up ARGV`` starts, as deploy/local/launcher.py lays them out:
    slots for the prefill replicas, then decode, then colocated ones; worker ``slot``
    serves its metrics on ``--metrics-base-port + slot``."""
    try:
        counts = [int(_last_value(argv, f"--{role}") or 0) for role in ("prefill", "decode")]
        counts.append(int(_last_value(argv, "--both") or 0))
        metrics_base = int(_last_value(argv, "--metrics-base-port") or 9100)
    except ValueError as e:
        raise ConfigError(f"pdserve setup: a worker count or port is not a number: {e}") from e
    engines: list[EngineEndpoint] = []
    for role, count in zip(("prefill", "decode", "both"), counts, strict=True):
        kind = EngineRole.PREFILL if role == "prefill" else EngineRole.SERVING
        for replica in range(count):
            port = metrics_base + len(engines)
            url = f"http://127.0.0.1:{port}/metrics"
            engines.append(EngineEndpoint(f"{role}-{replica}", url, kind))
    return engines
