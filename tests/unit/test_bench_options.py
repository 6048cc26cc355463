"""The shared bench flags: declared once, given to both commands with per-command defaults."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Annotated

import pytest
import typer
from typer.testing import CliRunner

from pdserve.bench.options import CommonFlags, OutputFlags, with_common_flags
from pdserve.bench.workloads import WorkloadKind


def _app(seen: list[tuple[str, CommonFlags, OutputFlags]], **defaults: object) -> typer.Typer:
    app = typer.Typer()

    @app.command()
    @with_common_flags(**defaults)
    def run(
        label: Annotated[str, typer.Option(help="own flag")],
        *,
        flags: CommonFlags,
        output: OutputFlags,
    ) -> None:
        seen.append((label, flags, output))

    return app


def test_every_common_flag_reaches_the_command_with_its_default() -> None:
    seen: list[tuple[str, CommonFlags, OutputFlags]] = []
    result = CliRunner().invoke(_app(seen, warmup=2), ["--label", "x"])
    assert result.exit_code == 0, result.output
    ((label, flags, output),) = seen
    assert label == "x"
    assert flags.warmup == 2  # the per-command default wins over the shared one (1)
    assert flags.workload is WorkloadKind.RANDOM and flags.num_requests == 32
    assert (flags.concurrency, flags.slo, flags.ignore_eos) == (None, None, True)
    assert output == OutputFlags(out=None, baseline=None, plots=True, progress=True)


def test_given_flags_are_parsed_into_the_dataclasses(tmp_path: Path) -> None:
    seen: list[tuple[str, CommonFlags, OutputFlags]] = []
    args = [
        "--label", "y", "--workload", "shared-prefix", "-n", "7", "--rates", "1,2",
        "--slo", "ttft=1s", "--no-ignore-eos", "--warmup", "0", "--out", str(tmp_path),
        "--baseline", "b", "--no-plots", "--no-progress",
    ]  # fmt: skip
    result = CliRunner().invoke(_app(seen), args)
    assert result.exit_code == 0, result.output
    ((_, flags, output),) = seen
    assert flags.workload is WorkloadKind.SHARED_PREFIX
    assert (flags.num_requests, flags.rates, flags.slo) == (7, "1,2", "ttft=1s")
    assert (flags.ignore_eos, flags.warmup) == (False, 0)
    assert output == OutputFlags(out=tmp_path, baseline="b", plots=False, progress=False)


def test_help_lists_every_common_flag() -> None:
    result = CliRunner().invoke(_app([]), ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for f in fields(CommonFlags):
        option = "--" + f.name.replace("_", "-")
        assert option + " " in result.output, option


def test_unknown_default_is_refused() -> None:
    with pytest.raises(TypeError, match="not a shared flag"):
        with_common_flags(warmups=3)
