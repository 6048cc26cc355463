"""`pdserve sim`: fit the simulator to `pdserve bench` runs, check it, study at scale."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from pdserve.sim.engine import Topology
from pdserve.sim.model import fit, read_bench
from pdserve.sim.study import measured, plot_study, replay_bench, scale_study

sim_app = typer.Typer(help="Discrete-event simulation of a pdserve cluster.", no_args_is_help=True)


@sim_app.command()
def validate(
    short: Annotated[Path, typer.Option(help="results.json: concurrency 1, short prompts")],
    long: Annotated[Path, typer.Option(help="results.json: concurrency 1, long prompts")],
    batched: Annotated[Path, typer.Option(help="results.json: concurrency > 1")],
    check: Annotated[list[Path], typer.Option(help="results.json runs to predict (repeat)")],
    kv_bytes_per_token: Annotated[float, typer.Option(help="model's KV bytes per token")],
    link_gbytes_per_s: Annotated[float, typer.Option(help="KV transfer bandwidth")] = 1.0,
    prefill: int = 1,
    decode: int = 1,
    out: Annotated[Path | None, typer.Option(help="write the comparison as JSON")] = None,
) -> None:
    """Fit the service model on three runs, then predict other runs of the same cluster
    and print predicted vs measured TTFT and ITL."""
    model = fit(
        read_bench(short),
        read_bench(long),
        read_bench(batched),
        kv_bytes_per_token,
        link_gbytes_per_s * 1e9,
    )
    report: dict[str, object] = {"model": model.to_json(), "runs": {}}
    typer.echo(json.dumps(model.to_json(), indent=1))
    for path in check:
        predicted = replay_bench(model, path, Topology(prefill, decode)).to_json()
        real = measured(path)
        rows = {
            key: {
                "measured": real[key],
                "predicted": predicted[key],
                "error": (predicted[key] - real[key]) / real[key] if real[key] else None,
            }
            for key in real
        }
        report["runs"][str(path)] = rows  # type: ignore[index]
        typer.echo(f"\n{path}")
        for key, row in rows.items():
            error = row["error"]
            shown = "" if error is None else f"{error:+.0%}"
            typer.echo(
                f"  {key:20s} measured {row['measured']:.4f}  predicted "
                f"{row['predicted']:.4f}  {shown}"
            )
    if out is not None:
        out.write_text(json.dumps(report, indent=1) + "\n")


@sim_app.command()
def study(
    out: Annotated[Path, typer.Option(help="folder for study.json and the plots")] = Path(
        "docs/img"
    ),
    rates: Annotated[str, typer.Option(help="offered loads, req/s")] = "150,250,350,450,550",
    duration_s: float = 40.0,
) -> None:
    """64 workers: P:D ratios and routing policies under Poisson load (GPU-class profile)."""
    result = scale_study([float(r) for r in rates.split(",")], duration_s=duration_s)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sim-study.json").write_text(json.dumps(result, indent=1) + "\n")
    for path in plot_study(result, out):
        typer.echo(path)
