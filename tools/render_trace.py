"""Render one exported trace as a Gantt chart (PNG), for docs/observability.md.

    python tools/render_trace.py SPANS.json OUT.png

SPANS.json is what tests/e2e/cluster/test_tracing.py writes when PDSERVE_TRACE_DUMP
names a file: the spans the router and workers exported over OTLP for one request.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

COLORS = {"pdserve-router": "#4C72B0", "pdserve-prefill": "#DD8452", "pdserve-decode": "#55A868"}


def tree_order(spans: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    ids = {s["span_id"] for s in spans}
    children: dict[str, list[dict[str, Any]]] = {}
    for s in spans:
        children.setdefault(s["parent_id"] if s["parent_id"] in ids else "", []).append(s)
    out: list[tuple[int, dict[str, Any]]] = []

    def walk(parent: str, depth: int) -> None:
        for s in sorted(children.get(parent, []), key=lambda s: (s["start_ns"], -s["end_ns"])):
            out.append((depth, s))
            walk(s["span_id"], depth + 1)

    walk("", 0)
    return out


def label(s: dict[str, Any]) -> str:
    a = s["attributes"]
    extra = ""
    if s["name"] == "kv_transfer":
        extra = (
            f"  {a.get('pdserve.kv.bytes', 0) / 1024:.0f} KiB, {a.get('pdserve.kv.blocks')} blocks"
        )
    elif s["name"] == "schedule":
        extra = f"  {a.get('pdserve.mode', '')}"
    elif s["name"].startswith("worker."):
        extra = f"  ({a.get('pdserve.worker', '')})"
    return s["name"] + extra


def main() -> None:
    with open(sys.argv[1]) as f:
        spans = json.load(f)
    rows = tree_order(spans)
    t0 = min(s["start_ns"] for s in spans)
    fig, ax = plt.subplots(figsize=(11, 0.42 * len(rows) + 1.2))
    for i, (_, s) in enumerate(rows):
        start, dur = (s["start_ns"] - t0) / 1e6, (s["end_ns"] - s["start_ns"]) / 1e6
        ax.barh(i, max(dur, 0.05), left=start, color=COLORS.get(s["service"], "grey"))
        ax.text(start + max(dur, 0.05) + 0.5, i, f"{dur:.1f} ms", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(["    " * d + label(s) for d, s in rows], fontsize=8, family="monospace")
    ax.invert_yaxis()
    ax.set_xlabel("milliseconds since the router received the request")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLORS.values()]
    ax.legend(handles, list(COLORS), loc="center right", fontsize=8)
    root = rows[0][1]
    ax.set_title(
        f"one request, one trace ({root['trace_id'][:16]}...): router -> prefill -> "
        "KV transfer (NIXL) -> decode, tiny model on 2 CPU cores",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=110)


if __name__ == "__main__":
    main()
