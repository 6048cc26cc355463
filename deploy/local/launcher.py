"""`pdserve up --backend local`: a router and prefill/decode workers as local processes.

Each component runs in its own process group (so vLLM's engine-core and TP/PP worker
processes are stopped with it) and dies with this launcher (PR_SET_PDEATHSIG). Ctrl-C
stops everything; a component that exits on its own is reported with its log tail.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pdserve.config import ClusterConfig, PoolConfig, Role
from pdserve.deploy.local.control import serve_control
from pdserve.deploy.local.pools import Pools
from pdserve.deploy.local.probes import grpc_serving, http_ready
from pdserve.errors import ConfigError, PdserveError
from pdserve.kv_transfer.metadata import KvLayout
from pdserve.kv_transfer.registry import transport_for
from pdserve.models import resolve_model

# Room for a worker's NIXL side-channel ports (one per data-parallel rank).
KV_PORTS_PER_WORKER = 8
# The last two ports of a worker's KV range: vLLM KV cache events (PUB) and their replay.
KV_EVENTS_PORT_OFFSET = 6
STOP_TIMEOUT_S = 20.0
START_TIMEOUT_S = 900.0


@dataclass
class Component:
    name: str
    argv: list[str]
    log_path: Path
    is_ready: Callable[[], bool]
    env: dict[str, str] = field(default_factory=dict)
    # Workers only: their pool and the slot that selects their ports.
    role: Role | None = None
    slot: int = -1
    proc: subprocess.Popen[bytes] | None = None
    ready: bool = False
    reported_exit: bool = False

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **self.env},
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        log.close()

    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def signal_group(self, sig: int) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _die_with_parent() -> None:
    """Runs in the child before exec: get SIGTERM if the launcher dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def cpu_binds(pools: list[PoolConfig], cores: list[int]) -> list[str]:
    """One VLLM_CPU_OMP_THREADS_BIND value per worker: each engine rank gets a core,
    round-robin over the available cores (ranks share cores when there are too few).

    Multi-rank (TP/PP) engines are not pinned when the host has fewer cores than the
    cluster has engine ranks: vLLM 0.32 then pinned every rank of both engines to the
    same core (measured: the four TP/PP ranks of a TP2 + PP2 cluster all on core 1 of 2,
    the prefill ranks starved behind the decode ranks and no request finished)."""
    binds: list[str] = []
    next_core = 0
    oversubscribed = sum(p.replicas * p.ranks for p in pools) > len(cores)
    for pool in pools:
        for _ in range(pool.replicas):
            if oversubscribed and pool.ranks > 1:
                binds.append("nobind")
                continue
            ranks = []
            for _ in range(pool.ranks):
                ranks.append(str(cores[next_core % len(cores)]))
                next_core += 1
            binds.append("|".join(ranks))
    return binds


def check_topology(config: ClusterConfig) -> None:
    """Refuse shapes that cannot work before starting anything."""
    if config.both.replicas == 0 and config.decode.replicas == 0:
        raise ConfigError("a cluster needs at least one decode or colocated worker")
    if config.prefill.replicas and not config.decode.replicas:
        raise ConfigError("prefill workers need decode workers to hand their KV to")
    transport = transport_for(config.kv_transport.value, config.kv_lease_s)
    if config.prefill.replicas and config.decode.replicas:

        def shape(pool: PoolConfig) -> KvLayout:
            return KvLayout(
                "", "", 0, 0, 0, 0, pool.tensor_parallel_size, pool.pipeline_parallel_size
            )

        try:
            transport.check_shapes(shape(config.prefill), shape(config.decode))
        except PdserveError as e:
            raise ConfigError(e.message) from e


def worker_component(
    config: ClusterConfig,
    model_path: Path,
    log_dir: Path,
    role: Role,
    name: str,
    slot: int,
    cpu_bind: str,
) -> Component:
    """One worker; ``slot`` selects its gRPC, metrics and NIXL side-channel ports."""
    pool = pool_of(config, role)
    port = config.worker_base_port + slot
    argv = [
        sys.executable, "-m", "pdserve.cli", "worker",
        "--role", role.value,
        "--model", str(model_path),
        "--served-model-name", config.served_model_name or model_path.name,
        "--worker-id", name,
        "--port", str(port),
        "--metrics-port", str(config.metrics_base_port + slot),
        "--kv-port", str(config.kv_base_port + slot * KV_PORTS_PER_WORKER),
        "--kv-events-port",
        str(config.kv_base_port + slot * KV_PORTS_PER_WORKER + KV_EVENTS_PORT_OFFSET),
        "--kv-lease-s", str(config.kv_lease_s),
        "--kv-shared-memory" if config.kv_shared_memory else "--no-kv-shared-memory",
        "--kv-transport", config.kv_transport.value,
        "--tensor-parallel-size", str(pool.tensor_parallel_size),
        "--pipeline-parallel-size", str(pool.pipeline_parallel_size),
        "--max-model-len", str(config.max_model_len),
        "--cpu-bind", cpu_bind,
    ]  # fmt: skip
    address = worker_address(config, slot)
    return Component(
        name, argv, log_dir / f"{name}.log", _grpc_probe(address), role=role, slot=slot
    )


def pool_of(config: ClusterConfig, role: Role) -> PoolConfig:
    return {Role.PREFILL: config.prefill, Role.DECODE: config.decode, Role.BOTH: config.both}[role]


def worker_address(config: ClusterConfig, slot: int) -> str:
    return f"127.0.0.1:{config.worker_base_port + slot}"


def control_url(config: ClusterConfig) -> str:
    return f"http://127.0.0.1:{config.control_port}"


def plan_components(
    config: ClusterConfig,
    model_path: Path,
    log_dir: Path,
    discovery: Sequence[str] | None = None,
) -> tuple[list[Component], Component]:
    """The initial worker components and the router component of a cluster. The router
    follows the launcher's pool membership (router/discovery/launcher.py), or what
    ``discovery`` (its --discovery arguments) says (the Ray backend)."""
    if discovery is None:
        discovery = ["--discovery", "launcher", "--launcher-url", control_url(config)]
    served = config.served_model_name or model_path.name
    pools = [(Role.PREFILL, config.prefill), (Role.DECODE, config.decode), (Role.BOTH, config.both)]
    binds = cpu_binds([p for _, p in pools], sorted(os.sched_getaffinity(0)))
    workers: list[Component] = []
    for role, pool in pools:
        for replica in range(pool.replicas):
            slot = len(workers)
            name = f"{role.value}-{replica}"
            workers.append(
                worker_component(config, model_path, log_dir, role, name, slot, binds[slot])
            )
    router = Component(
        "router",
        [
            sys.executable,
            "-m",
            "pdserve.cli",
            "router",
            "--model",
            str(model_path),
            "--served-model-name",
            served,
            "--http-port",
            str(config.http_port),
            "--grpc-port",
            str(config.grpc_port),
            *discovery,
            *(["--policy", config.policy] if config.policy else []),
            *(["--disaggregation", config.disaggregation] if config.disaggregation else []),
        ],
        log_dir / "router.log",
        lambda: http_ready(f"http://127.0.0.1:{config.http_port}/ready"),
    )
    return workers, router


def worker_factory(
    config: ClusterConfig, model_path: Path, log_dir: Path, first_core: int
) -> Callable[[Role, str, int], Component]:
    """Builds the workers a scale-up adds; their cores continue the round-robin."""
    cores = sorted(os.sched_getaffinity(0))
    next_core = first_core

    def build(role: Role, name: str, slot: int) -> Component:
        nonlocal next_core
        ranks = pool_of(config, role).ranks
        bind = "|".join(str(cores[(next_core + r) % len(cores)]) for r in range(ranks))
        next_core += ranks
        return worker_component(config, model_path, log_dir, role, name, slot, bind)

    return build


def _grpc_probe(address: str) -> Callable[[], bool]:
    return lambda: grpc_serving(address)


class Cluster:
    def __init__(self, pools: Pools, router: Component, say: Callable[[str], None]) -> None:
        self.pools = pools
        self.router = router
        self.say = say

    @property
    def workers(self) -> list[Component]:
        return self.pools.components

    @property
    def components(self) -> list[Component]:
        return [*self.workers, self.router]

    def start_and_wait(self, timeout_s: float) -> bool:
        """Start workers, then the router once workers are up. False if something died."""
        from rich.console import Console

        started = time.monotonic()
        for c in self.workers:
            c.start()
        with Console(stderr=True).status("") as status:
            if not self._wait_ready(self.workers, started, timeout_s, status.update):
                return False
            self.pools.reconcile()  # the ready workers become the pools' members
            self.router.start()
            # The router is ready once it has members: keep the pools moving meanwhile.
            return self._wait_ready(
                [self.router], started, timeout_s, status.update, tick=self.pools.reconcile
            )

    def _wait_ready(
        self,
        group: list[Component],
        started: float,
        timeout_s: float,
        show: Callable[[str], None],
        tick: Callable[[], None] = lambda: None,
    ) -> bool:
        while not all(c.ready for c in group):
            tick()
            elapsed = time.monotonic() - started
            for c in group:
                if c.exit_code() is not None:
                    self._report_exit(c)
                    return False
                if not c.ready and c.is_ready():
                    c.ready = True
                    self.say(f"{c.name} ready ({elapsed:.0f} s)")
            waiting = ", ".join(c.name for c in group if not c.ready)
            show(f"loading engines: waiting for {waiting} ({elapsed:.0f} s)")
            if elapsed > timeout_s:
                self.say(f"gave up after {timeout_s:.0f} s waiting for {waiting}")
                return False
            time.sleep(0.5)
        return True

    def supervise(self, stop_requested: Callable[[], bool]) -> int:
        """Run until Ctrl-C or the router exits, resizing the pools to their targets
        (`pdserve scale`); the pools report workers that exit on their own."""
        while not stop_requested():
            self.pools.reconcile()
            if self.router.exit_code() is not None:
                self._report_exit(self.router)
                return 1
            time.sleep(0.5)
        return 0

    def _report_exit(self, c: Component) -> None:
        c.reported_exit = True
        self.say(f"{c.name} exited with code {c.exit_code()}; last lines of {c.log_path}:")
        print(c.log_tail(), file=sys.stderr)

    def stop(self) -> None:
        """SIGTERM every process group (workers drain), then SIGKILL what is left."""
        for c in [self.router, *self.workers]:
            c.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for c in self.components:
            if c.proc is None:
                continue
            with contextlib.suppress(subprocess.TimeoutExpired):
                c.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            # Engine-core and TP/PP processes share the group: make sure none is left.
            c.signal_group(signal.SIGKILL)


def _say(message: str) -> None:
    print(f"pdserve: {message}", file=sys.stderr, flush=True)


def run_cluster(config: ClusterConfig, log_dir: Path | None) -> int:
    check_topology(config)
    _say(f"preparing model {config.model!r} (first use converts it once)")
    model_path = resolve_model(config.model)
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="pdserve-logs-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    workers, router = plan_components(config, model_path, log_dir)
    _say(f"starting {len(workers)} workers and the router; logs in {log_dir}")
    used_cores = sum(pool_of(config, role).ranks * pool_of(config, role).replicas for role in Role)
    factory = worker_factory(config, model_path, log_dir, first_core=used_cores)
    pools = Pools(factory, _say, lambda slot: worker_address(config, slot))
    for w in workers:
        assert w.role is not None  # (set for every worker by worker_component)
        pools.adopt(w, w.role, w.slot)
    cluster = Cluster(pools, router, _say)
    return serve_cluster(config, cluster, model_path, "stopping all processes")


def serve_cluster(config: ClusterConfig, cluster: Cluster, model_path: Path, stopping: str) -> int:
    """Serve the control endpoint, start ``cluster`` and supervise it until Ctrl-C or
    SIGTERM; stop everything on the way out (saying ``stopping`` first). The exit code."""
    control = serve_control("127.0.0.1", config.control_port, cluster.pools)
    stop_requested = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    try:
        if not cluster.start_and_wait(START_TIMEOUT_S):
            return 1
        _print_ready(config, config.served_model_name or model_path.name)
        signal.signal(signal.SIGINT, request_stop)
        return cluster.supervise(lambda: stop_requested)
    except KeyboardInterrupt:
        return 130
    finally:
        _say(stopping)
        control.shutdown()
        cluster.stop()
        _say("stopped")


def _pool_summary(config: ClusterConfig) -> str:
    return (
        f"{config.prefill.replicas} prefill + {config.decode.replicas} decode + "
        f"{config.both.replicas} colocated workers"
    )


def _example_body(served: str) -> dict[str, object]:
    question = {"role": "user", "content": "What is the capital of France?"}
    return {"model": served, "messages": [question], "max_tokens": 32, "temperature": 0}


def _print_ready(config: ClusterConfig, served: str) -> None:
    base = f"http://127.0.0.1:{config.http_port}"
    print(
        f"""
pdserve is ready: {_pool_summary(config)}
  OpenAI API   {base}/v1   (model "{served}")
  gRPC API     127.0.0.1:{config.grpc_port}   (pdserve.v1.Inference, health, reflection)
  metrics      {base}/metrics   workers: 127.0.0.1:{config.metrics_base_port}..

Try it:
  curl {base}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{json.dumps(_example_body(served))}'

Press Ctrl-C to stop.
""",
        flush=True,
    )
