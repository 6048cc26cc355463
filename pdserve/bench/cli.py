"""``pdserve bench``: drive OpenAI-compatible endpoints, or start and compare setups."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markdown import Markdown
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pdserve.bench.arrival import ArrivalSpec
from pdserve.bench.client import RequestResult
from pdserve.bench.compare import run_compare, sigterm_as_interrupt
from pdserve.bench.options import CommonFlags, OutputFlags, with_common_flags
from pdserve.bench.report import BenchReport, environment, markdown, write_report
from pdserve.bench.runner import PhaseHook, ResultHook, RunPlan, TargetResult, run_interleaved
from pdserve.bench.runner import served_model as fetch_served_model
from pdserve.bench.setups import DEFAULT_SETUPS, SetupContext, SetupSpec
from pdserve.bench.workloads import load_tokenizer
from pdserve.errors import ConfigError, PdserveError

bench_app = typer.Typer(
    help="Benchmark OpenAI-compatible endpoints: TTFT, TPOT, ITL, throughput, SLO goodput.",
    no_args_is_help=True,
)


@contextlib.contextmanager
def _progress(enabled: bool, console: Console) -> Iterator[PhaseHook | None]:
    if not enabled:
        yield None
        return
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("ok {task.fields[ok]} err {task.fields[err]}"),
        TimeElapsedColumn(),
        console=console,
    )

    def on_phase(target: str, arrival: ArrivalSpec, count: int) -> ResultHook:
        task = progress.add_task(f"{target} {arrival.label}", total=count, ok=0, err=0)
        counts = {"ok": 0, "err": 0}

        def on_result(result: RequestResult) -> None:
            counts["ok" if result.ok else "err"] += 1
            progress.update(task, advance=1, ok=counts["ok"], err=counts["err"])

        return on_result

    with progress:
        yield on_phase


def _out_dir(out: Path | None) -> Path:
    return out or Path("bench-results") / dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def _finish(
    console: Console,
    plan: RunPlan,
    targets: list[TargetResult],
    flags: dict[str, object],
    out: Path,
    output: OutputFlags,
) -> None:
    report = BenchReport(
        workload=plan.workload.summary(),
        targets=targets,
        environment=environment(flags),
        slo=plan.slo.describe() if plan.slo else None,
        baseline=output.baseline,
        attainment=plan.attainment,
    )
    files = write_report(report, out, plots=output.plots)
    text = markdown(report)
    # Rich renders tables to fit the terminal; on narrow ones plain markdown reads better.
    if console.width >= 140:
        console.print(Markdown(text))
    else:
        console.print(text, markup=False, highlight=False, soft_wrap=True)
    console.print("wrote " + ", ".join(str(f) for f in files))


def _fail(console: Console, err: PdserveError) -> typer.Exit:
    console.print(f"[red]error:[/red] {err.message}")
    return typer.Exit(2)


@bench_app.command()
@with_common_flags(warmup=1)
def serve(
    target: Annotated[
        list[str], typer.Option(help="endpoint base URL, e.g. http://127.0.0.1:8000 (repeat)")
    ],
    name: Annotated[list[str] | None, typer.Option(help="label per --target, in order")] = None,
    model: Annotated[
        str | None, typer.Option(help="model id (default: first of /v1/models)")
    ] = None,
    tokenizer: Annotated[str, typer.Option(help="model folder, 'default' or 'tiny'")] = "default",
    *,
    flags: CommonFlags,
    output: OutputFlags,
) -> None:
    """Run a workload against running endpoints (interleaved phase by phase) and report."""
    console = Console(stderr=True)
    names = list(name or [])
    if names and len(names) != len(target):
        raise typer.BadParameter("give one --name per --target, or none")
    try:
        plan = flags.plan(load_tokenizer(tokenizer), model or "")
        targets = []
        for i, url in enumerate(target):
            label = names[i] if names else (f"target{i}" if len(target) > 1 else "target")
            served = model or asyncio.run(fetch_served_model(url))
            targets.append(TargetResult(label, url.rstrip("/"), served))
        with _progress(output.progress, console) as hook:
            asyncio.run(run_interleaved(targets, plan, hook))
    except PdserveError as e:
        raise _fail(console, e) from e
    run_flags = {**flags.to_json(), "tokenizer": tokenizer, "targets": target}
    _finish(console, plan, targets, run_flags, _out_dir(output.out), output)


@bench_app.command()
@with_common_flags(warmup=2)
def compare(
    model: Annotated[str, typer.Option(help="'default', 'tiny' or a model folder")] = "default",
    served_model_name: Annotated[
        str | None, typer.Option(help="model id (default: folder name)")
    ] = None,
    setup: Annotated[
        list[str] | None,
        typer.Option(
            help="[LABEL=]vllm|vllm-pd|vllm-dp|pdserve[:EXTRA ARGS] (repeat; default: vllm,"
            " vllm-pd, pdserve)"
        ),
    ] = None,
    attach: Annotated[
        list[str] | None, typer.Option(help="NAME=URL of a running setup (repeat)")
    ] = None,
    port_base: Annotated[int, typer.Option(help="first port; each setup takes 20")] = 18000,
    side_channel_port_base: Annotated[
        int, typer.Option(help="first NIXL side-channel port")
    ] = 18600,
    startup_timeout: Annotated[
        float, typer.Option(help="seconds for a setup to get ready")
    ] = 900.0,
    stop_timeout: Annotated[float, typer.Option(help="seconds after SIGINT before SIGKILL")] = 30.0,
    max_model_len: int = 2048,
    kv_cache_gib: Annotated[int, typer.Option(help="VLLM_CPU_KVCACHE_SPACE per engine")] = 1,
    log_dir: Annotated[Path | None, typer.Option(help="setup logs (default OUT/logs)")] = None,
    cache_block_size: Annotated[
        int | None,
        typer.Option(
            help="KV block size for the ideal prefix-cache hit rate (default: the"
            " engines' own, from vllm:cache_config_info)"
        ),
    ] = None,
    *,
    flags: CommonFlags,
    output: OutputFlags,
) -> None:
    """Start each setup in turn on the same model and cores, run the same workload, report."""
    from pdserve.models import resolve_model

    console = Console(stderr=True)
    flags = replace(flags, max_context=min(flags.max_context, max_model_len))
    out_dir = _out_dir(output.out)
    try:
        specs = [SetupSpec.parse(s) for s in setup or ([] if attach else DEFAULT_SETUPS)]
        specs += [SetupSpec.attach(a) for a in attach or []]
        labels = [s.label for s in specs]
        if len(set(labels)) != len(labels):
            raise typer.BadParameter(f"setup labels must differ: {labels}")
        path = resolve_model(model)
        ctx = SetupContext(
            model_path=path,
            served_name=served_model_name or path.name,
            log_dir=(log_dir or out_dir / "logs").resolve(),
            port_base=port_base,
            side_channel_base=side_channel_port_base,
            max_model_len=max_model_len,
            kv_cache_gib=kv_cache_gib,
        )
        plan = flags.plan(load_tokenizer(str(path)), ctx.served_name)
        if cache_block_size is not None:
            if cache_block_size < 1:
                raise ConfigError("--cache-block-size must be >= 1")
            plan = replace(plan, cache_block_size=cache_block_size)
    except PdserveError as e:
        raise _fail(console, e) from e
    targets: list[TargetResult] = []
    interrupted = False
    try:
        with sigterm_as_interrupt(), _progress(output.progress, console) as hook:
            run_compare(specs, ctx, plan, startup_timeout, stop_timeout, hook, console.log, targets)
    except KeyboardInterrupt:
        interrupted = True  # the setups are stopped; keep what was measured
        console.print("[yellow]interrupted: writing a partial report[/yellow]")
    run_flags = {
        **flags.to_json(),
        "model": str(path),
        "setups": [s.label + "=" + (s.url or s.kind) for s in specs],
        "port_base": port_base,
        "max_model_len": max_model_len,
        "kv_cache_gib": kv_cache_gib,
        "cache_block_size": cache_block_size,
    }
    if interrupted:
        run_flags["interrupted"] = True
        targets = [t for t in targets if t.phases or t.error]
    _finish(console, plan, targets, run_flags, out_dir, output)
    if interrupted:
        raise typer.Exit(130)
    if all(t.error for t in targets):
        raise typer.Exit(1)


@bench_app.command("kv-transfer")
def kv_transfer(
    size_mib: Annotated[
        list[int] | None, typer.Option(help="transfer size in MiB (repeat; default 1..256)")
    ] = None,
    repeats: Annotated[int, typer.Option(help="timed transfers per size")] = 10,
    chunk_bytes: Annotated[int, typer.Option(help="gRPC chunk size")] = 4 * 1024 * 1024,
    port: Annotated[int, typer.Option(help="loopback port of the gRPC server")] = 32700,
    nixl: Annotated[bool, typer.Option(help="also measure NIXL (UCX) in the same run")] = True,
    out: Annotated[Path | None, typer.Option(help="output folder (JSON + PNG)")] = None,
) -> None:
    """KV transfer on loopback: pdserve's gRPC transport vs NIXL, GB/s and latency."""
    from pdserve.bench.kv_transfer import run

    sizes = size_mib or [1, 4, 16, 64, 256]
    out_dir = _out_dir(out)
    results = run(out_dir, sizes, repeats, port, chunk_bytes, nixl)
    console = Console()
    for r in results:
        console.print(
            f"{r.transport:8} {r.size_bytes >> 20:4d} MiB  {r.gbps_median:6.2f} GB/s  "
            f"p50 {r.latency_p50_s * 1000:8.2f} ms  p90 {r.latency_p90_s * 1000:8.2f} ms  "
            f"p99 {r.latency_p99_s * 1000:8.2f} ms"
        )
    console.print(f"wrote {out_dir / 'kv_transfer.json'} and {out_dir / 'kv_transfer.png'}")


if __name__ == "__main__":
    bench_app()
