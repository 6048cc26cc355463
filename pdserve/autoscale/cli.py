"""`pdserve planner`: size the prefill and decode pools toward latency targets."""

from __future__ import annotations

import logging
import signal
import sys
from typing import Annotated

import typer

from pdserve.autoscale.loop import Autoscaler
from pdserve.autoscale.policy import PoolLimits, Slo, SloPlanner
from pdserve.autoscale.scaler import KubernetesScaler, LauncherScaler, Scaler, Workload
from pdserve.autoscale.signals import MetricsSource
from pdserve.config import Role
from pdserve.errors import ConfigError, ScalingError


def _workload(value: str, option: str) -> Workload:
    kind, _, name = value.partition("/")
    if not name:
        raise typer.BadParameter("use KIND/NAME, e.g. Deployment/pdserve-decode", param_hint=option)
    return Workload(kind, name)


def _worker_urls(values: list[str]) -> dict[Role, list[str]]:
    urls: dict[Role, list[str]] = {}
    for value in values:
        role, _, url = value.partition("=")
        try:
            urls.setdefault(Role(role), []).append(url)
        except ValueError as e:
            raise typer.BadParameter("use ROLE=URL", param_hint="--worker-metrics") from e
    return urls


def planner(
    router_url: Annotated[str, typer.Option(help="the router (its /metrics)")] = (
        "http://127.0.0.1:8000"
    ),
    backend: Annotated[
        str, typer.Option(help="launcher (`pdserve up`) | ray (`--backend ray`) | kubernetes")
    ] = "launcher",
    ray_address: Annotated[
        str, typer.Option(help="ray backend: the Ray cluster (GCS host:port)")
    ] = "",
    ray_namespace: Annotated[str, typer.Option(help="ray backend: the cluster's")] = "pdserve",
    control_url: Annotated[str, typer.Option(help="launcher backend: control endpoint")] = (
        "http://127.0.0.1:50050"
    ),
    namespace: Annotated[str, typer.Option(help="kubernetes backend")] = "default",
    prefill_workload: Annotated[
        str | None, typer.Option(help="kubernetes backend: KIND/NAME of the prefill pool")
    ] = None,
    decode_workload: Annotated[
        str | None, typer.Option(help="kubernetes backend: KIND/NAME of the decode pool")
    ] = None,
    worker_metrics: Annotated[
        list[str] | None,
        typer.Option(help="ROLE=URL of a worker's /metrics (queues, KV usage); repeat"),
    ] = None,
    ttft_p90_s: Annotated[float, typer.Option(help="target p90 time to first token")] = 1.0,
    itl_p90_s: Annotated[float, typer.Option(help="target p90 inter-token latency")] = 0.1,
    min_prefill: int = 1,
    max_prefill: int = 4,
    min_decode: int = 1,
    max_decode: int = 4,
    up_cooldown_s: float = 60.0,
    down_cooldown_s: float = 300.0,
    interval_s: Annotated[float, typer.Option(help="seconds per metrics window")] = 15.0,
    log_level: str = "info",
) -> None:
    """Scale the prefill and decode pools separately toward TTFT/ITL p90 targets."""
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr)
    try:
        slo = Slo(ttft_p90_s=ttft_p90_s, itl_p90_s=itl_p90_s)
        limits = {
            Role.PREFILL: PoolLimits(min_prefill, max_prefill, up_cooldown_s, down_cooldown_s),
            Role.DECODE: PoolLimits(min_decode, max_decode, up_cooldown_s, down_cooldown_s),
        }
        scaler: Scaler
        if backend == "launcher":
            scaler = LauncherScaler(control_url)
        elif backend == "kubernetes":
            if not (prefill_workload and decode_workload):
                raise ConfigError("the kubernetes backend needs --prefill/--decode-workload")
            workloads = {
                Role.PREFILL: _workload(prefill_workload, "--prefill-workload"),
                Role.DECODE: _workload(decode_workload, "--decode-workload"),
            }
            scaler = KubernetesScaler(namespace, workloads)
        elif backend == "ray":
            from pdserve.autoscale.ray_scaler import RayScaler

            if not ray_address:
                raise ConfigError("the ray backend needs --ray-address")
            scaler = RayScaler.connect(ray_address, ray_namespace)
        else:
            raise ConfigError(f"unknown backend {backend!r}; use launcher, ray or kubernetes")
    except (ConfigError, ScalingError) as e:
        typer.secho(f"error: {e.message}", fg="red", err=True)
        raise typer.Exit(2) from e
    source = MetricsSource(router_url, _worker_urls(worker_metrics or []))
    autoscaler = Autoscaler(source, SloPlanner(slo, limits), scaler)
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    autoscaler.run(interval_s, lambda: stopping)
