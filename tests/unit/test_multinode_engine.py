"""A worker's engine spanning nodes: the flags reach vLLM's own engine arguments."""

from __future__ import annotations

from typing import Any

import pytest

from pdserve.config import EngineConfig
from pdserve.errors import ConfigError


def test_single_node_passes_only_the_parallel_sizes() -> None:
    ec = EngineConfig("m", "m", tensor_parallel_size=4, pipeline_parallel_size=2)
    assert ec.parallel_args() == {"tensor_parallel_size": 4, "pipeline_parallel_size": 2}


def test_mp_backend_makes_this_worker_node_zero_of_the_group() -> None:
    ec = EngineConfig(
        "m", "m", tensor_parallel_size=8, pipeline_parallel_size=2, nnodes=2,
        master_addr="leader.pool", master_port=29600, distributed_executor_backend="mp",
    )  # fmt: skip
    args = ec.parallel_args()
    assert args["nnodes"] == 2 and args["node_rank"] == 0
    assert (args["master_addr"], args["master_port"]) == ("leader.pool", 29600)
    assert args["distributed_executor_backend"] == "mp"


def test_ray_backend_leaves_placement_to_ray() -> None:
    ec = EngineConfig(
        "m", "m", tensor_parallel_size=16, nnodes=2, distributed_executor_backend="ray"
    )
    args = ec.parallel_args()
    assert args["distributed_executor_backend"] == "ray"
    assert "nnodes" not in args and "master_addr" not in args


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"nnodes": 0}, "at least 1"),
        ({"tensor_parallel_size": 3, "nnodes": 2, "master_addr": "a"}, "must divide"),
        ({"tensor_parallel_size": 2, "nnodes": 2}, "needs --master-addr"),
        ({"distributed_executor_backend": "slurm"}, "mp or ray"),
    ],
)
def test_inconsistent_layouts_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        EngineConfig("m", "m", **kwargs)


def test_vllm_accepts_and_checks_the_multi_node_arguments() -> None:
    """The keyword names are vLLM's: its own argument check sees the node layout."""
    arg_utils = pytest.importorskip("vllm.engine.arg_utils")
    ec = EngineConfig(
        "m", "m", tensor_parallel_size=4, nnodes=2, master_addr="10.0.0.1",
        distributed_executor_backend="mp",
    )  # fmt: skip
    args = arg_utils.AsyncEngineArgs(model="m", **ec.parallel_args())
    assert (args.nnodes, args.node_rank, args.master_addr) == (2, 0, "10.0.0.1")
    assert args.master_port == ec.master_port


def test_worker_cli_refuses_a_multi_node_engine_without_a_master() -> None:
    """The refusal comes before any model or engine is loaded, as a usage error."""
    from typer.testing import CliRunner

    from pdserve.cli import app

    result = CliRunner().invoke(
        app, ["worker", "--role=decode", "--model=tiny", "--tensor-parallel-size=2", "--nnodes=2"]
    )
    assert result.exit_code == 2
    assert "--master-addr" in result.output
