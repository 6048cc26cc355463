"""Internal ports bind to loopback unless an operator says otherwise."""

from __future__ import annotations

import inspect

from pdserve import cli
from pdserve.config import EngineConfig, Role, RouterConfig, WorkerConfig
from pdserve.router import cli as router_cli

LOOPBACK = "127.0.0.1"


def test_config_defaults_bind_loopback() -> None:
    worker = WorkerConfig(Role.DECODE, EngineConfig("m", "m"), "w")
    router = RouterConfig("m", "m")
    assert worker.host == LOOPBACK  # gRPC, metrics and the KV side channel use it
    assert (router.http_host, router.grpc_host) == (LOOPBACK, LOOPBACK)
    assert router.auth.api_keys == ()  # no built-in key anyone could know


def test_cli_defaults_bind_loopback() -> None:
    worker = inspect.signature(cli.worker).parameters
    router = inspect.signature(router_cli.router).parameters
    assert worker["host"].default == LOOPBACK
    assert router["http_host"].default == LOOPBACK
    assert router["grpc_host"].default == LOOPBACK
