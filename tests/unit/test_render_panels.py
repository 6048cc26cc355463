"""deploy/grafana/render_panels.py: the dashboard's own queries, variables filled in, drawn
to a PNG from what a Prometheus-compatible query_range API answers."""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.unit.test_dashboards import DASHBOARD

SCRIPT = Path(__file__).resolve().parents[2] / "deploy/grafana/render_panels.py"


@pytest.fixture(scope="module")
def rp() -> ModuleType:
    spec = importlib.util.spec_from_file_location("render_panels", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class FakePrometheus:
    """Answers /api/v1/query_range with two series per query (one with a NaN point), and
    remembers the queries; a query containing `nothing_here` gets an empty result."""

    def __init__(self) -> None:
        self.queries: list[dict[str, str]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                params = dict(urllib.parse.parse_qsl(url.query))
                fake.queries.append(params)
                start, end, step = (float(params[k]) for k in ("start", "end", "step"))
                times = [start + i * step for i in range(int((end - start) / step) + 1)]
                result: list[dict[str, Any]] = []
                if "nothing_here" not in params["query"]:
                    for pod in ("prefill-0", "decode-0"):
                        values = [[t, str(0.25 * i)] for i, t in enumerate(times)]
                        values[1][1] = "NaN"
                        labels = {"pod": pod, "role": pod.split("-")[0], "le": "1"}
                        result.append({"metric": labels, "values": values})
                body = json.dumps(
                    {"status": "success", "data": {"resultType": "matrix", "result": result}}
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def prometheus() -> Iterator[FakePrometheus]:
    fake = FakePrometheus()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


def test_variables_and_legends(rp: ModuleType) -> None:
    expr = 'rate(x{namespace=~"$namespace"}[$__rate_interval])'
    assert rp.fill_variables(expr, "prod", "30s") == 'rate(x{namespace=~"prod"}[30s])'
    assert rp.legend_text("running {{pod}}", {"pod": "p-0"}) == "running p-0"
    assert rp.legend_text("{{ route }} {{status}}", {"route": "/v1"}) == "/v1"
    assert rp.legend_text("", {"b": "2", "a": "1"}) == "a=1,b=2"


@pytest.mark.parametrize(
    ("value", "unit", "text"),
    [
        (0.0123, "s", "12.3 ms"),
        (2.5, "s", "2.5 s"),
        (0.42, "percentunit", "42%"),
        (3 * 1024 * 1024, "bytes", "3 MiB"),
        (2048, "Bps", "2 KiB/s"),
        (1.5, "reqps", "1.5 req/s"),
        (7, "short", "7"),
    ],
)
def test_units_read_like_grafana(rp: ModuleType, value: float, unit: str, text: str) -> None:
    assert rp.format_value(value, unit) == text


def test_rows_select_their_panels(rp: ModuleType) -> None:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    kv = rp.select_rows(panels, ["KV transfer"])
    assert kv[0]["type"] == "row" and kv[0]["title"] == "KV transfer"
    assert all(p["type"] != "row" for p in kv[1:]) and len(kv) > 3
    assert rp.select_rows(panels, None) == panels
    # Two rows far apart in the dashboard follow each other in the picture.
    two = rp.select_rows(panels, ["Overview", "KV transfer"])
    titles = [p["title"] for p in two if p["type"] == "row"]
    assert titles == ["Overview", "KV transfer"]
    overview_bottom = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in two[: len(two) - len(kv)])
    assert two[len(two) - len(kv)]["gridPos"]["y"] == overview_bottom
    assert [p["gridPos"]["x"] for p in two[-len(kv) :]] == [p["gridPos"]["x"] for p in kv]


def test_renders_every_panel_with_the_dashboards_queries(
    rp: ModuleType, prometheus: FakePrometheus, tmp_path: Path
) -> None:
    out = tmp_path / "board.png"
    counts = rp.render_dashboard(prometheus.url, 1000.0, 1100.0, out, None, "prod", "20s")
    assert out.read_bytes()[:4] == b"\x89PNG"
    board = json.loads(DASHBOARD.read_text())
    wanted = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    sent = [q["query"] for q in prometheus.queries]
    assert sent == [rp.fill_variables(e, "prod", "20s") for e in wanted]
    assert not any("$" in q for q in sent)
    assert {(q["start"], q["end"]) for q in prometheus.queries} == {("1000.0", "1100.0")}
    rows = {p["gridPos"]["y"]: p["title"] for p in board["panels"] if p["type"] == "row"}
    titled = [p for p in board["panels"] if p["type"] != "row"]
    row_of = {p["id"]: rows[max(y for y in rows if y < p["gridPos"]["y"])] for p in titled}
    assert list(counts) == [f"{row_of[p['id']]}: {p['title']}" for p in titled]
    assert all(n >= 2 for n in counts.values())


def test_nan_points_are_dropped_and_empty_results_kept_empty(
    rp: ModuleType, prometheus: FakePrometheus
) -> None:
    import httpx

    panel = {"targets": [{"expr": "up", "legendFormat": "{{pod}}"}, {"expr": "nothing_here"}]}
    with httpx.Client(trust_env=False) as http:
        series = rp.panel_series(http, prometheus.url, panel, (0.0, 4.0, 1.0), ".*", "5s")
    assert [s.legend for s in series] == ["prefill-0", "decode-0"]
    for s in series:
        assert s.times == [0.0, 2.0, 3.0, 4.0]  # the NaN at t=1 is left out
        assert s.values == [0.0, 0.5, 0.75, 1.0]
