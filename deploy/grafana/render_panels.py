"""Render the Grafana dashboard's panels to a PNG from a real Prometheus, without Grafana.

    # a Prometheus that already scrapes pdserve:
    python deploy/grafana/render_panels.py --prometheus http://127.0.0.1:9090 --minutes 15
    # or start everything here: a tiny local 1P+1D cluster, Prometheus, a short load:
    python deploy/grafana/render_panels.py --local --out docs/img/dashboard.png

Every panel's PromQL comes from deploy/grafana/pdserve.json (built by build_dashboard.py)
and runs through Prometheus' HTTP API (`/api/v1/query_range`), with the dashboard's
variables filled in (`$namespace`, `$__rate_interval`); the panels keep their grid
positions, titles, units and legends. `--local` needs the Debian `prometheus` server and
runs engines: take /tmp/pdserve-engines.lock around it on shared machines.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.ticker import FuncFormatter

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy/grafana/pdserve.json"
GRID_COLUMNS = 24  # Grafana's grid width
WORKERS = ("prefill-0", "decode-0")  # `pdserve up --prefill 1 --decode 1`, in slot order


@dataclass(frozen=True)
class Series:
    legend: str
    times: list[float]
    values: list[float]


# --- Prometheus -------------------------------------------------------------------------


def fill_variables(expr: str, namespace: str, rate_interval: str) -> str:
    """The dashboard's template variables, as Grafana would substitute them."""
    return expr.replace("$__rate_interval", rate_interval).replace("$namespace", namespace)


def legend_text(template: str, labels: dict[str, str]) -> str:
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template)
    return " ".join(text.split()) or ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def query_range(
    http: httpx.Client, url: str, expr: str, start: float, end: float, step: float
) -> list[dict[str, Any]]:
    params: dict[str, str | float] = {"query": expr, "start": start, "end": end, "step": step}
    resp = http.get(url.rstrip("/") + "/api/v1/query_range", params=params)
    body = resp.json()
    if resp.status_code != 200 or body.get("status") != "success":
        raise RuntimeError(f"Prometheus refused {expr!r}: {body.get('error', resp.text[:200])}")
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def panel_series(
    http: httpx.Client, url: str, panel: dict[str, Any], window: tuple[float, float, float],
    namespace: str, rate_interval: str,
) -> list[Series]:  # fmt: skip
    out = []
    for target in panel.get("targets", []):
        expr = fill_variables(target["expr"], namespace, rate_interval)
        for s in query_range(http, url, expr, *window):
            values = [(float(t), float(v)) for t, v in s["values"]]
            finite = [(t, v) for t, v in values if math.isfinite(v)]
            if finite:
                legend = legend_text(target.get("legendFormat", ""), s["metric"])
                out.append(Series(legend, [t for t, _ in finite], [v for _, v in finite]))
    return out


# --- Drawing ----------------------------------------------------------------------------


def _human(value: float, base: float, units: tuple[str, ...]) -> str:
    for unit in units[:-1]:
        if abs(value) < base:
            return f"{value:.3g} {unit}".strip()
        value /= base
    return f"{value:.3g} {units[-1]}"


def format_value(value: float, unit: str) -> str:
    if unit == "s":
        if value == 0:
            return "0"
        return f"{value * 1000:.3g} ms" if abs(value) < 1 else f"{value:.3g} s"
    if unit == "percentunit":
        return f"{value * 100:.3g}%"
    if unit == "reqps":
        return f"{value:.3g} req/s"
    if unit == "bytes":
        return _human(value, 1024, ("B", "KiB", "MiB", "GiB", "TiB"))
    if unit == "Bps":
        return _human(value, 1024, ("B/s", "KiB/s", "MiB/s", "GiB/s", "TiB/s"))
    return f"{value:.3g}"


def _unit(panel: dict[str, Any]) -> str:
    unit: str = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
    return unit


def draw_timeseries(ax: Axes, panel: dict[str, Any], series: list[Series], t0: float) -> None:
    unit = _unit(panel)
    for s in series[:8]:
        ax.plot([t - t0 for t in s.times], s.values, linewidth=1.2, label=s.legend[:40])
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: format_value(v, unit)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0f}s"))
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.set_ylim(bottom=0)
    if series:
        ax.legend(fontsize=6, loc="upper left", frameon=False, ncol=2)


def draw_stat(ax: Axes, panel: dict[str, Any], series: list[Series], t0: float) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    if not series:
        return
    last = series[0].values[-1]
    ax.fill_between([t - t0 for t in series[0].times], series[0].values, alpha=0.15)
    ax.text(0.5, 0.45, format_value(last, _unit(panel)), ha="center", va="center",
            fontsize=16, weight="bold", transform=ax.transAxes)  # fmt: skip


def render(
    panels: list[dict[str, Any]], data: dict[int, list[Series]], window: tuple[float, float],
    out: Path, title: str,
) -> None:  # fmt: skip
    """Place every panel at its grid position (24 columns; heights in grid units); the x
    axes show seconds since the window's start."""
    t0, t1 = window
    top = min(p["gridPos"]["y"] for p in panels)
    units = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels) - top + 1.5  # + title
    fig = plt.figure(figsize=(20, 0.32 * units), dpi=80)
    fig.text(0.005, 1 - 0.75 / units, title, fontsize=14, weight="bold", va="center")

    def box(p: dict[str, Any]) -> tuple[float, float, float, float]:
        """Axes rectangle in figure fractions, leaving room for the title and tick labels."""
        g = p["gridPos"]
        y = g["y"] - top + 1.5
        left, width = g["x"] / GRID_COLUMNS + 0.035, g["w"] / GRID_COLUMNS - 0.045
        return left, 1 - (y + g["h"] - 0.6) / units, width, (g["h"] - 1.5) / units

    for p in panels:
        if p["type"] == "row":
            y = p["gridPos"]["y"] - top + 1.5
            fig.text(0.005, 1 - (y + 0.6) / units, p["title"], fontsize=12, weight="bold")
            continue
        ax = fig.add_axes(box(p))
        ax.set_xlim(0, t1 - t0)
        ax.set_title(p["title"], fontsize=9, loc="left")
        series = data.get(p["id"], [])
        if p["type"] == "stat":
            draw_stat(ax, p, series, t0)
        else:
            draw_timeseries(ax, p, series, t0)
        if not series:
            ax.text(0.5, 0.5, "No data", ha="center", va="center", color="grey",
                    transform=ax.transAxes)  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def select_rows(panels: list[dict[str, Any]], rows: list[str] | None) -> list[dict[str, Any]]:
    """The panels under the named rows (all when ``rows`` is None), in dashboard order,
    moved up so that the chosen rows follow each other without gaps."""
    if rows is None:
        return panels
    keep: list[dict[str, Any]] = []
    current, shift, bottom = None, 0, 0
    for p in panels:
        if p["type"] == "row":
            current = p["title"]
            shift = bottom - p["gridPos"]["y"]
        if current in rows:
            moved = {**p, "gridPos": {**p["gridPos"], "y": p["gridPos"]["y"] + shift}}
            keep.append(moved)
            bottom = max(bottom, moved["gridPos"]["y"] + moved["gridPos"]["h"])
    return keep


def render_dashboard(
    prometheus: str, start: float, end: float, out: Path, rows: list[str] | None,
    namespace: str = ".*", rate_interval: str = "",
) -> dict[str, int]:  # fmt: skip
    """Query every panel over [start, end] and write the PNG; returns the number of series
    per panel, keyed "row: panel title"."""
    board = json.loads(DASHBOARD.read_text())
    panels = select_rows(board["panels"], rows)
    if not panels:
        raise SystemExit(f"no panels under rows {rows}")
    step = max(1.0, (end - start) / 300)
    interval = rate_interval or f"{max(15, int(4 * step))}s"
    data: dict[int, list[Series]] = {}
    with httpx.Client(timeout=30, trust_env=False) as http:
        for p in panels:
            if p["type"] != "row":
                window = (start, end, step)
                data[p["id"]] = panel_series(http, prometheus, p, window, namespace, interval)
    title = f"{board['title']}: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(end))}"
    render(panels, data, (start, end), out, title)
    counts, row = {}, ""
    for p in panels:
        if p["type"] == "row":
            row = p["title"]
        else:
            counts[f"{row}: {p['title']}"] = len(data[p["id"]])
    return counts


# --- --local: a tiny cluster, Prometheus and a load ------------------------------------


@contextmanager
def process(argv: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A child in its own process group; SIGINT to the group at the end, then SIGKILL."""
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        try:
            yield proc
        finally:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)
            with suppress(subprocess.TimeoutExpired):
                proc.wait(60)
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_ok(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args!r} exited; see {log}")
        with suppress(httpx.HTTPError):
            if httpx.get(url, timeout=5, trust_env=False).status_code == 200:
                return
        time.sleep(1)
    raise SystemExit(f"{url} not ready in {timeout_s:.0f} s; see {log}")


def prometheus_config(router: str, workers: dict[str, str]) -> dict[str, Any]:
    """Scrape the router and workers with the labels the chart's ServiceMonitor gives them
    on Kubernetes (namespace, pod), so the dashboard's queries work unchanged."""
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "router",
                "static_configs": [
                    {"targets": [router], "labels": {"namespace": "local", "pod": "router-0"}}
                ],
            },
            {
                "job_name": "workers",
                "honor_labels": True,
                "static_configs": [
                    {"targets": [addr], "labels": {"namespace": "local", "pod": name}}
                    for name, addr in workers.items()
                ],
            },
        ],
    }


def run_local(args: argparse.Namespace) -> dict[str, int]:
    binary = shutil.which("prometheus")
    if binary is None:
        raise SystemExit("--local needs the prometheus server (Debian package prometheus)")
    base = args.port_base
    http_port, metrics_base, prom_port = base, base + 20, base + 90
    work = Path(tempfile.mkdtemp(prefix="pdserve-render-"))
    py = sys.executable
    up = [
        py, "-m", "pdserve.cli", "up", "--model", "tiny", "--served-model-name", "tiny",
        "--prefill", "1", "--decode", "1", "--http-port", str(http_port),
        "--grpc-port", str(base + 1), "--worker-base-port", str(base + 10),
        "--metrics-base-port", str(metrics_base), "--kv-base-port", str(base + 40),
        "--max-model-len", "512", "--log-dir", str(work / "cluster"),
    ]  # fmt: skip
    print(f"work dir {work}", file=sys.stderr)
    with process(up, work / "up.log") as cluster:
        wait_ok(f"http://127.0.0.1:{http_port}/ready", cluster, work / "up.log", 900)
        workers = {name: f"127.0.0.1:{metrics_base + i}" for i, name in enumerate(WORKERS)}
        config = work / "prometheus.yml"
        config.write_text(json.dumps(prometheus_config(f"127.0.0.1:{http_port}", workers)))
        prom = [
            binary, f"--config.file={config}", f"--storage.tsdb.path={work / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ]  # fmt: skip
        url = f"http://127.0.0.1:{prom_port}"
        with process(prom, work / "prometheus.log") as server:
            wait_ok(url + "/-/ready", server, work / "prometheus.log", 60)
            start = time.time()
            time.sleep(5)
            load = [
                py, "-m", "pdserve.bench", "serve", "--target", f"http://127.0.0.1:{http_port}",
                "--tokenizer", "tiny", "--workload", "shared-prefix", "--groups", "4",
                "--prefix-len", "96", "--input-len", "16-64", "--output-len", "16-64",
                "--max-context", "512", "-n", str(args.requests), "--rates", args.rates,
                "--request-timeout", "60", "--no-progress", "--no-plots",
                "--out", str(work / "load"),
            ]  # fmt: skip
            with (work / "load.log").open("wb") as out:
                subprocess.run(load, stdout=out, stderr=subprocess.STDOUT, check=False)
            time.sleep(8)  # the last scrapes and rate windows
            end = time.time()
            counts = render_dashboard(url, start, end, args.out, args.rows, "local")
    print(f"logs and the load report: {work}", file=sys.stderr)
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prometheus", help="Prometheus base URL")
    parser.add_argument("--minutes", type=float, default=15, help="time range to render")
    parser.add_argument("--namespace", default=".*", help="the dashboard's $namespace")
    parser.add_argument("--local", action="store_true", help="cluster + Prometheus + load")
    parser.add_argument("--port-base", type=int, default=33100, help="--local: first port")
    parser.add_argument("--requests", type=int, default=40, help="--local: per load phase")
    parser.add_argument("--rates", default="1,3", help="--local: Poisson rates of the load")
    parser.add_argument("--rows", help="comma-separated row titles (default: all)")
    parser.add_argument("--out", type=Path, default=Path("dashboard.png"))
    args = parser.parse_args()
    args.rows = [r.strip() for r in args.rows.split(",")] if args.rows else None
    if args.local:
        counts = run_local(args)
    elif args.prometheus:
        end = time.time()
        start = end - args.minutes * 60
        counts = render_dashboard(args.prometheus, start, end, args.out, args.rows, args.namespace)
    else:
        parser.error("give --prometheus URL or --local")
    empty = [title for title, n in counts.items() if n == 0]
    print(f"wrote {args.out}: {len(counts)} panels, {len(empty)} without data {empty}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
