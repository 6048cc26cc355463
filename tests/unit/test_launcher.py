"""The local launcher's plan: core binding, ports, refused topologies, worker argv."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
import typer

from pdserve.cli import app
from pdserve.config import ClusterConfig, PoolConfig, Role
from pdserve.deploy.local.launcher import check_topology, cpu_binds, plan_components
from pdserve.errors import ConfigError


def test_cpu_binds_round_robin_over_cores() -> None:
    pools = [PoolConfig(1, tensor_parallel_size=2), PoolConfig(1, pipeline_parallel_size=2)]
    assert cpu_binds(pools, [0, 1, 2, 3]) == ["0|1", "2|3"]
    assert cpu_binds([PoolConfig(1), PoolConfig(1)], [0, 1]) == ["0", "1"]
    # Single-rank engines share cores when there are too few.
    assert cpu_binds([PoolConfig(3)], [4, 5]) == ["4", "5", "4"]


def test_multi_rank_engines_are_not_pinned_on_too_few_cores() -> None:
    pools = [PoolConfig(1, tensor_parallel_size=2), PoolConfig(1, pipeline_parallel_size=2)]
    assert cpu_binds(pools, [0, 1]) == ["nobind", "nobind"]
    assert cpu_binds([PoolConfig(1, tensor_parallel_size=2), PoolConfig(1)], [0, 1]) == [
        "nobind",
        "0",
    ]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            ClusterConfig("tiny", decode=PoolConfig(0), both=PoolConfig(1)),
            "prefill workers need decode",
        ),
        (ClusterConfig("tiny", prefill=PoolConfig(0), decode=PoolConfig(0)), "at least one"),
        (ClusterConfig("tiny", prefill=PoolConfig(1, pipeline_parallel_size=2)), "pipeline"),
    ],
)
def test_refused_topologies(config: ClusterConfig, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_topology(config)


def test_components_have_distinct_ports_and_router_follows_the_launcher(tmp_path: Path) -> None:
    config = ClusterConfig(
        "tiny", prefill=PoolConfig(2), decode=PoolConfig(2, tensor_parallel_size=2)
    )
    workers, router = plan_components(config, tmp_path / "model", tmp_path)
    assert [w.name for w in workers] == ["prefill-0", "prefill-1", "decode-0", "decode-1"]
    for flag in ("--port", "--metrics-port", "--kv-port"):
        values = [w.argv[w.argv.index(flag) + 1] for w in workers]
        assert len(set(values)) == len(values), flag
    assert [(w.role, w.slot) for w in workers] == [
        (Role.PREFILL, 0), (Role.PREFILL, 1), (Role.DECODE, 2), (Role.DECODE, 3),
    ]  # fmt: skip
    # The router learns its workers from the launcher's control endpoint, not a list.
    assert "--prefill" not in router.argv and "--decode" not in router.argv
    url = router.argv[router.argv.index("--launcher-url") + 1]
    assert url == f"http://127.0.0.1:{config.control_port}"
    assert router.argv[router.argv.index("--discovery") + 1] == "launcher"
    # Every argv is accepted by the real CLI parser.
    cli = typer.main.get_command(app)
    for component in [*workers, router]:
        args = component.argv[component.argv.index("pdserve.cli") + 1 :]
        with click.Context(cli) as ctx:
            command = cli.get_command(ctx, args[0])  # type: ignore[attr-defined]
            assert command is not None
            command.make_context(args[0], args[1:])
