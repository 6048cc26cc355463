"""`pdserve up --backend ray`: every worker under a Ray actor, the router found through Ray.

Each worker is the same `pdserve worker` process the local backend starts, supervised by
a ``WorkerSupervisor`` actor (deploy/ray/actors.py) that is placed with a placement group
of TP x PP one-CPU bundles (so Ray reserves a core per engine rank). Engine processes,
NIXL and ports work as locally. The pools' state machine (start, join when SERVING,
leave, router drain, stop) is the local backend's ``Pools``; only how a worker is started,
probed and signalled differs. The membership reaches the router through a
``ClusterRegistry`` actor in the cluster's namespace (router/discovery/ray.py), which is
also where `pdserve scale --backend ray` leaves its requests. The local control endpoint
(`pdserve scale --control-url`) is served as well.

Placement groups are pinned to the launcher's node: worker addresses are 127.0.0.1 and
their ports are the launcher's slots, as locally (see docs/ray.md). Every actor is owned
by this process: Ctrl-C stops the workers (drained), kills the actors and removes the
placement groups; if this process dies, Ray kills its actors and each worker process gets
SIGTERM from its actor's death (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdserve.config import ClusterConfig, RayConfig, Role
from pdserve.deploy.local.launcher import (
    STOP_TIMEOUT_S,
    Cluster,
    Component,
    check_topology,
    plan_components,
    pool_of,
    serve_cluster,
    worker_address,
    worker_factory,
)
from pdserve.deploy.local.pools import Pools, WorkerFactory
from pdserve.deploy.ray.actors import (
    REGISTRY_NAME,
    WORKER_PREFIX,
    ClusterRegistry,
    WorkerSupervisor,
)
from pdserve.errors import ConfigError
from pdserve.models import resolve_model

# Exit code reported for a worker whose actor died (the process went with it).
ACTOR_DIED = -9
CALL_TIMEOUT_S = 10.0


@dataclass
class RayContext:
    """What every worker of one cluster shares: the node its bundles are pinned to."""

    node_resource: str  # "node:<ip>", a resource only the launcher's node has

    def bundles(self, ranks: int) -> list[dict[str, float]]:
        return [{"CPU": 1.0, self.node_resource: 0.001} for _ in range(ranks)]


class _Poll:
    """A non-blocking view of a remote call that is repeated: ``get`` returns the last
    answer and starts the next call when the previous one has answered."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self._call = call
        self._ref: Any = None

    def get(self) -> tuple[bool, Any]:
        """(answered, value) of the call in flight; starts one if none is."""
        import ray

        if self._ref is None:
            self._ref = self._call()
        done, _ = ray.wait([self._ref], timeout=0)
        if not done:
            return False, None
        ref, self._ref = self._ref, None
        return True, ray.get(ref)


@dataclass
class RayWorker(Component):
    """A worker component whose process runs under a ``WorkerSupervisor`` actor."""

    ranks: int = 1
    context: RayContext | None = None
    handle: Any = None
    group: Any = None  # its placement group
    _exit: int | None = None
    _exit_poll: _Poll | None = None
    _ready_poll: _Poll | None = None

    @classmethod
    def of(cls, component: Component, ranks: int, context: RayContext) -> RayWorker:
        values = {f.name: getattr(component, f.name) for f in dataclasses.fields(Component)}
        return cls(**values, ranks=ranks, context=context)

    def start(self) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        assert self.context is not None
        self.group = placement_group(
            self.context.bundles(self.ranks), strategy="STRICT_PACK", name=f"pdserve-{self.name}"
        )
        actor: Any = ray.remote(WorkerSupervisor)
        actor = actor.options(
            name=WORKER_PREFIX + self.name,
            num_cpus=1,
            max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=self.group, placement_group_bundle_index=0
            ),
        )
        address = worker_address_of(self.argv)
        self.handle = actor.remote(self.name, self.argv, self.env, str(self.log_path), address)
        self._exit_poll = _Poll(lambda: self.handle.exit_code.remote())
        self._ready_poll = _Poll(lambda: self.handle.ready.remote())

    def exit_code(self) -> int | None:
        if self._exit is not None or self._exit_poll is None:
            return self._exit
        from ray.exceptions import RayActorError

        try:
            answered, code = self._exit_poll.get()
        except RayActorError:
            answered, code = True, ACTOR_DIED
        if answered and code is not None:
            self._exit = code
        return self._exit

    def __post_init__(self) -> None:
        self.is_ready = self._probe  # the actor probes the worker's gRPC health

    def _probe(self) -> bool:
        if self._ready_poll is None:
            return False
        from ray.exceptions import RayActorError

        try:
            answered, ready = self._ready_poll.get()
        except RayActorError:
            return False
        return bool(answered and ready)

    def signal_group(self, sig: int) -> None:
        if self.handle is None or self._exit is not None:
            return
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        with contextlib.suppress(RayActorError, GetTimeoutError):
            ray.get(self.handle.signal.remote(sig), timeout=CALL_TIMEOUT_S)

    def log_tail(self, lines: int = 15) -> str:
        # The actor runs on this node (pinned bundles): its log file is readable here.
        return super().log_tail(lines)

    def release(self) -> None:
        """Kill the actor (its worker gets SIGTERM from the actor's death) and free the
        placement group."""
        import ray
        from ray.util.placement_group import remove_placement_group

        if self.handle is not None:
            with contextlib.suppress(Exception):
                ray.kill(self.handle)
        if self.group is not None:
            with contextlib.suppress(Exception):
                remove_placement_group(self.group)
        self.handle = self.group = None


def worker_address_of(argv: list[str]) -> str:
    return f"127.0.0.1:{argv[argv.index('--port') + 1]}"


class RayPools(Pools):
    """The local pools, plus one exchange with the registry actor per step: publish the
    membership, take the router's report and the resize requests."""

    def __init__(self, registry: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.registry = registry

    def reconcile(self, now: float | None = None) -> None:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        super().reconcile(now)
        with self._lock:
            membership = self.sync(self._router_applied, self._router_in_flight)
            view = self.describe()
        try:
            applied, in_flight, requests = ray.get(
                self.registry.exchange.remote(membership, view), timeout=CALL_TIMEOUT_S
            )
        except (GetTimeoutError, RayActorError) as e:
            self._say(f"cluster registry unreachable: {e!r}")
            return
        with self._lock:
            self._router_applied, self._router_in_flight = applied, in_flight
        if not requests:
            return
        answers = []
        for request_id, role, replicas in requests:
            try:
                self.set_target(Role(role), replicas)
                answers.append((request_id, ""))
            except ConfigError as e:
                answers.append((request_id, e.message))
        # The new targets are visible before the requests are answered (calls from one
        # caller reach an actor in order): a scaler never sees its change missing.
        self.registry.publish.remote(self.describe())
        for request_id, error in answers:
            self.registry.resolved.remote(request_id, error)

    def _reap_exited(self) -> None:
        leaving = [m for m in self.members if m.component.exit_code() is not None]
        super()._reap_exited()
        for m in leaving:
            if isinstance(m.component, RayWorker):
                m.component.release()


class RayCluster(Cluster):
    def stop(self) -> None:
        """SIGTERM the router and every worker (they drain), wait, then kill what is left
        and every actor and placement group."""
        self.router.signal_group(signal.SIGTERM)
        for w in self.workers:
            w.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline and any(c.exit_code() is None for c in self.components):
            time.sleep(0.5)
        for w in self.workers:
            w.signal_group(signal.SIGKILL)
            if isinstance(w, RayWorker):
                w.release()
        if self.router.proc is not None:
            with contextlib.suppress(Exception):
                self.router.proc.wait(timeout=1)
        self.router.signal_group(signal.SIGKILL)


def ray_factory(
    config: ClusterConfig, model_path: Path, log_dir: Path, first_core: int, context: RayContext
) -> WorkerFactory:
    local = worker_factory(config, model_path, log_dir, first_core)

    def build(role: Role, name: str, slot: int) -> Component:
        return RayWorker.of(local(role, name, slot), pool_of(config, role).ranks, context)

    return build


def connect(ray_config: RayConfig) -> tuple[str, RayContext]:
    """Join the Ray cluster at ``ray_config.address`` (or start a local one); returns
    the GCS address the router joins and the node pinning."""
    import ray

    if ray_config.address:
        ray.init(address=ray_config.address, namespace=ray_config.namespace)
    else:
        ray.init(
            address="local",
            namespace=ray_config.namespace,
            num_cpus=ray_config.num_cpus or os.cpu_count(),
            include_dashboard=False,
        )
    context = ray.get_runtime_context()
    node = next(n for n in ray.nodes() if n["NodeID"] == context.get_node_id())
    return context.gcs_address, RayContext(f"node:{node['NodeManagerAddress']}")


def start_registry() -> Any:
    import ray

    with contextlib.suppress(ValueError):
        ray.get_actor(REGISTRY_NAME)
        raise ConfigError(
            "a pdserve cluster already runs in this Ray namespace; pass another --ray-namespace"
        )
    actor: Any = ray.remote(ClusterRegistry)
    registry = actor.options(name=REGISTRY_NAME, num_cpus=0, max_restarts=0).remote()
    ray.get(registry.describe.remote(), timeout=60)
    return registry


def _say(message: str) -> None:
    print(f"pdserve: {message}", file=sys.stderr, flush=True)


def run_ray_cluster(config: ClusterConfig, ray_config: RayConfig, log_dir: Path | None) -> int:
    import ray

    check_topology(config)
    _say(f"preparing model {config.model!r} (first use converts it once)")
    model_path = resolve_model(config.model)
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="pdserve-logs-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    where = ray_config.address or "a new local Ray runtime"
    _say(f"joining {where} (namespace {ray_config.namespace!r})")
    gcs, context = connect(ray_config)
    try:
        registry = start_registry()
        discovery = [
            "--discovery", "ray", "--ray-address", gcs, "--ray-namespace", ray_config.namespace,
        ]  # fmt: skip
        workers, router = plan_components(config, model_path, log_dir, discovery)
        used = sum(pool_of(config, r).ranks * pool_of(config, r).replicas for r in Role)
        factory = ray_factory(config, model_path, log_dir, used, context)
        pools = RayPools(registry, factory, _say, lambda slot: worker_address(config, slot))
        for w in workers:
            assert w.role is not None  # (set for every worker by worker_component)
            pools.adopt(RayWorker.of(w, pool_of(config, w.role).ranks, context), w.role, w.slot)
        _say(f"starting {len(workers)} worker actors and the router; logs in {log_dir}")
        return _serve(config, RayCluster(pools, router, _say), model_path)
    finally:
        with contextlib.suppress(Exception):
            ray.kill(ray.get_actor(REGISTRY_NAME))
        ray.shutdown()


def _serve(config: ClusterConfig, cluster: RayCluster, model_path: Path) -> int:
    return serve_cluster(config, cluster, model_path, "stopping the workers and their actors")
