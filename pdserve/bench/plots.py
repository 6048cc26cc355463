"""PNG plots of a benchmark: latency CDFs per phase, goodput and latency vs offered rate.

Uses matplotlib's object API with the Agg canvas (no pyplot, no global figure state).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from pdserve.bench.runner import PhaseResult, TargetResult

_CDF_PANELS = (("TTFT", "ttft"), ("TPOT", "tpot"), ("ITL", "itl"), ("end-to-end", "e2e"))


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", label).strip("_")


def _samples(phase: PhaseResult, key: str) -> list[float]:
    ok = [r for r in phase.results if r.ok]
    if key == "ttft":
        return [r.ttft_s * 1000 for r in ok if r.ttft_s is not None]
    if key == "tpot":
        return [t * 1000 for r in ok if (t := r.tpot_s) is not None]
    if key == "itl":
        return [gap * 1000 for r in ok for gap in r.itl_s]
    return [r.e2e_s * 1000 for r in ok]


def _wide(values: Sequence[float]) -> bool:
    """Whether values span more than two decades: then only a log axis shows them all."""
    positive = [v for v in values if v > 0]
    return bool(positive) and max(positive) / min(positive) > 100


def write_plots(
    targets: Sequence[TargetResult], out_dir: Path, attainment: float = 0.9
) -> list[Path]:
    """Write the plots into ``out_dir``; returns their paths (none if matplotlib is absent)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    except ImportError:
        return []
    written = []
    labels = list(dict.fromkeys(p.arrival.label for t in targets for p in t.phases))
    for label in labels:
        name = "latency_cdf.png" if len(labels) == 1 else f"latency_cdf_{_slug(label)}.png"
        path = out_dir / name
        _cdf_figure(targets, label, path)
        written.append(path)
    if any(sum(p.arrival.offered_rate is not None for p in t.phases) >= 2 for t in targets):
        path = out_dir / "goodput_vs_rate.png"
        _rate_figure(targets, path, attainment)
        written.append(path)
    return written


def _cdf_figure(targets: Sequence[TargetResult], label: str, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    for ax, (title, key) in zip(axes.flat, _CDF_PANELS, strict=True):
        seen: list[float] = []
        for index, target in enumerate(targets):
            for phase in target.phases:
                if phase.arrival.label != label:
                    continue
                values = sorted(_samples(phase, key))
                # Per request, the denominator is every request sent: a failed request
                # never arrives, so a setup with failures tops out below 1.
                total = len(values) if key == "itl" else len(phase.results)
                if values:
                    ys = [(i + 1) / total for i in range(len(values))]
                    ax.step(values, ys, where="post", label=target.name, color=f"C{index}")
                    seen += values
        if _wide(seen):
            ax.set_xscale("log")
        ax.set_title(f"{title} CDF")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests sent" if key != "itl" else "fraction of gaps")
        ax.set_ylim(0, 1.02)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right")
    fig.suptitle(f"Latency CDFs ({label})")
    fig.savefig(path, dpi=100)


def _rate_figure(targets: Sequence[TargetResult], path: Path, attainment: float) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax_slo, ax_tput, ax_ttft = fig.subplots(1, 3)
    ttft_p90s: list[float] = []
    for index, target in enumerate(targets):
        color = f"C{index}"  # one colour per target across the panels
        phases = sorted(
            (p for p in target.phases if p.arrival.offered_rate is not None),
            key=lambda p: p.arrival.offered_rate or 0.0,
        )
        if not phases:
            continue
        rates = [p.arrival.offered_rate or 0.0 for p in phases]
        met = [p.metrics.slo_attainment for p in phases]
        if all(m is not None for m in met):
            ax_slo.plot(
                rates, [100 * (m or 0.0) for m in met], marker="o", label=target.name, color=color
            )
        throughput = [p.metrics.request_throughput for p in phases]
        ax_tput.plot(rates, throughput, marker="o", label=target.name, color=color)
        goodput = [p.metrics.goodput_rps for p in phases]
        if all(g is not None for g in goodput):
            ax_tput.plot(
                rates, [g or 0.0 for g in goodput], marker="x", linestyle="--",
                label=f"{target.name} goodput", color=color,
            )  # fmt: skip
        p90 = [p.metrics.ttft_s.p90 * 1000 if p.metrics.ttft_s else float("nan") for p in phases]
        ax_ttft.plot(rates, p90, marker="o", label=target.name, color=color)
        ttft_p90s += [v for v in p90 if v == v]  # drop NaN
    if _wide(ttft_p90s):
        ax_ttft.set_yscale("log")
    ax_slo.axhline(100 * attainment, color="grey", linestyle=":", label=f"{attainment:.0%}")
    ax_slo.set_title("SLO attainment vs offered rate")
    ax_slo.set_ylabel("% of requests meeting the SLO")
    ax_slo.set_ylim(0, 105)
    ax_tput.set_title("throughput and goodput vs offered rate")
    ax_tput.set_ylabel("requests/s")
    ax_ttft.set_title("TTFT p90 vs offered rate")
    ax_ttft.set_ylabel("ms")
    for ax in (ax_slo, ax_tput, ax_ttft):
        ax.set_xlabel("offered rate (requests/s)")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.savefig(path, dpi=100)
