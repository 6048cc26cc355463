"""The streaming client and runner against a fake OpenAI SSE server on loopback.

The fake server's behaviour is chosen by the prompt's first word, so one workload can
mix healthy streams with each failure the client must classify.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from pdserve.bench.arrival import ArrivalKind, ArrivalSpec
from pdserve.bench.cli import bench_app
from pdserve.bench.client import ClientOptions, StreamingClient
from pdserve.bench.metrics import Slo
from pdserve.bench.runner import run_phase
from pdserve.bench.workloads import BenchRequest, Workload

GAP_S = 0.02
FIRST_S = 0.05


class FakeOpenAI:
    """A tiny HTTP/1.1 server speaking just enough of /v1/completions streaming."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.bodies: list[dict[str, Any]] = []
        self.max_in_flight = 0
        self._in_flight = 0
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self._sock = sock
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FakeOpenAI:
        self._thread.start()
        self._ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._handle, sock=self._sock))
        self._ready.set()
        self.loop.run_forever()
        server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            path = lines[0].split()[1]
            length = 0
            for line in lines[1:]:
                if line.lower().startswith("content-length:"):
                    length = int(line.split(":")[1])
            body = json.loads(await reader.readexactly(length)) if length else {}
            if path == "/v1/models":
                await self._send_json(writer, 200, {"data": [{"id": "fake-model"}]})
            elif path != "/v1/completions":
                await self._send_json(writer, 404, {"error": {"message": "no such route"}})
            else:
                self._in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self._in_flight)
                try:
                    self.bodies.append(body)
                    await self._complete(writer, body)
                finally:
                    self._in_flight -= 1
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _send_json(self, writer: asyncio.StreamWriter, status: int, obj: object) -> None:
        data = json.dumps(obj).encode()
        writer.write(
            f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n"
            f"content-length: {len(data)}\r\nconnection: close\r\n\r\n".encode()
            + data
        )
        await writer.drain()

    async def _complete(self, writer: asyncio.StreamWriter, body: dict[str, Any]) -> None:
        mode = body["prompt"].split()[0]
        n = int(body["max_tokens"])
        if mode == "http500":
            await self._send_json(writer, 500, {"error": {"message": "boom"}})
            return
        if mode == "hang":
            await asyncio.sleep(5)
            return
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
        )

        async def event(obj: object | str) -> None:
            data = obj if isinstance(obj, str) else json.dumps(obj)
            writer.write(f"data: {data}\n\n".encode())
            await writer.drain()

        await asyncio.sleep(FIRST_S)
        for i in range(n):
            if i:
                await asyncio.sleep(GAP_S)
            if mode == "midstream" and i == 2:
                await event({"error": {"message": "worker died", "code": 502}})
                await event("[DONE]")
                return
            if mode == "cut" and i == 2:
                return  # connection closes: no finish reason, no [DONE]
            if mode == "garbage" and i == 1:
                await event("{not json")
                return
            finish = "length" if i == n - 1 else None
            text = "" if mode == "emptytext" else f" t{i}"
            await event({"choices": [{"index": 0, "text": text, "finish_reason": finish}]})
        usage = {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n}
        await event({"choices": [], "usage": usage})
        await event("[DONE]")


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


def req(prompt: str, max_tokens: int = 5, rid: str = "r") -> BenchRequest:
    return BenchRequest(rid, prompt, 3, max_tokens)


async def test_healthy_stream_timings(fake: FakeOpenAI) -> None:
    async with StreamingClient(fake.url, ClientOptions(model="fake-model")) as client:
        result = await client.send(req("ok hello", 5), origin=0.0)
    assert result.ok, result.error
    assert result.output_tokens == 5 and result.server_prompt_tokens == 7
    assert result.finish_reason == "length"
    assert result.ttft_s is not None and FIRST_S * 0.8 < result.ttft_s < FIRST_S + 1.0
    assert len(result.itl_s) == 4 and all(GAP_S * 0.5 < g < GAP_S + 0.5 for g in result.itl_s)
    assert result.e2e_s >= result.ttft_s + sum(result.itl_s) - 1e-6
    assert result.tpot_s is not None and result.tpot_s > GAP_S * 0.5
    body = fake.bodies[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["model"] == "fake-model"


async def test_tokens_without_text_still_count(fake: FakeOpenAI) -> None:
    """vLLM streams one event per token, with empty text for tokens that decode to nothing."""
    async with StreamingClient(fake.url, ClientOptions(model="fake-model")) as client:
        result = await client.send(req("emptytext x", 4), origin=0.0)
    assert result.ok, result.error
    assert result.output_tokens == 4 and len(result.itl_s) == 3


@pytest.mark.parametrize(
    ("prompt", "kind"),
    [
        ("http500 x", "http_500"),
        ("midstream x", "stream_error"),
        ("cut x", "incomplete"),
        ("garbage x", "protocol"),
        ("hang x", "timeout"),
    ],
)
async def test_failures_are_classified(fake: FakeOpenAI, prompt: str, kind: str) -> None:
    options = ClientOptions(model="fake-model", timeout_s=0.5)
    async with StreamingClient(fake.url, options) as client:
        result = await client.send(req(prompt, 5), origin=0.0)
    assert not result.ok
    assert result.error_kind == kind, result.error
    assert result.error


async def test_connection_refused() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    async with StreamingClient(f"http://127.0.0.1:{port}/v1", ClientOptions(model="m")) as client:
        result = await client.send(req("ok x"), origin=0.0)
    assert not result.ok and result.error_kind == "connect"


async def test_every_request_accounted_for(fake: FakeOpenAI) -> None:
    modes = ["ok", "ok", "http500", "midstream", "cut", "garbage", "ok", "hang"] * 2
    chains = tuple((req(f"{m} {i}", 4, f"r{i}"),) for i, m in enumerate(modes))
    workload = Workload("mixed", chains)
    options = ClientOptions(model="fake-model", timeout_s=0.5)
    seen: list[str] = []
    async with StreamingClient(fake.url, options) as client:
        phase = await run_phase(
            client, workload, ArrivalSpec(concurrency=3), Slo(ttft_s=1.0),
            lambda r: seen.append(r.request_id),
        )  # fmt: skip
    assert sorted(seen) == sorted(r.request_id for r in workload.requests)
    assert [r.request_id for r in phase.results] == [f"r{i}" for i in range(len(modes))]
    m = phase.metrics
    assert (m.num_requests, m.completed, m.failed) == (16, 6, 10)
    assert m.errors_by_kind == {
        "http_500": 2, "stream_error": 2, "incomplete": 2, "protocol": 2, "timeout": 2
    }  # fmt: skip
    assert m.slo_met == 6 and m.slo_attainment == pytest.approx(6 / 16)
    assert fake.max_in_flight <= 3


async def test_sessions_run_in_order_and_open_loop_caps(fake: FakeOpenAI) -> None:
    chains = tuple(
        tuple(BenchRequest(f"s{s}t{t}", f"ok s{s}t{t}", 3, 2, f"s{s}", t) for t in range(3))
        for s in range(4)
    )
    arrival = ArrivalSpec(kind=ArrivalKind.POISSON, rate=200.0, max_concurrency=2, seed=1)
    async with StreamingClient(fake.url, ClientOptions(model="fake-model")) as client:
        phase = await run_phase(client, Workload("chat", chains), arrival, None)
    assert all(r.ok for r in phase.results)
    assert fake.max_in_flight <= 2
    by_id = {r.request_id: r for r in phase.results}
    for s in range(4):
        for t in (1, 2):
            prev, cur = by_id[f"s{s}t{t - 1}"], by_id[f"s{s}t{t}"]
            assert cur.start_s >= prev.end_s - 1e-6


def test_serve_cli_writes_a_report(fake: FakeOpenAI, tmp_path: Path) -> None:
    out = tmp_path / "report"
    args = [
        "serve", "--target", fake.url, "--target", fake.url + "/v1", "--name", "a",
        "--name", "b", "--tokenizer", "tiny", "-n", "6", "--input-len", "16",
        "--output-len", "3", "--rates", "50,100", "--slo", "ttft=2s,tpot=1s",
        "--warmup", "1", "--out", str(out), "--no-progress",
    ]  # fmt: skip
    result = CliRunner().invoke(bench_app, args)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    assert [t["name"] for t in data["targets"]] == ["a", "b"]
    for target in data["targets"]:
        assert target["model"] == "fake-model"
        assert [p["arrival"]["rate"] for p in target["phases"]] == [50, 100]
        for phase in target["phases"]:
            assert len(phase["requests"]) == 6 == phase["metrics"]["completed"]
        assert target["goodput_rate"] == 100
    assert data["environment"]["versions"]["pdserve"]
    md = (out / "report.md").read_text()
    assert "Ratios vs `a`" in md and "## Goodput" in md
    for png in ("latency_cdf_rate_50.png", "latency_cdf_rate_100.png", "goodput_vs_rate.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_compare_attaches_to_running_endpoints(fake: FakeOpenAI, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    args = [
        "compare", "--model", "tiny", "--attach", f"one={fake.url}", "--attach",
        f"two={fake.url}", "-n", "5", "--workload", "shared-prefix", "--groups", "2",
        "--prefix-len", "20", "--input-len", "4", "--output-len", "3", "--burst", "5:0",
        "--baseline", "two", "--out", str(out), "--no-progress", "--no-plots",
    ]  # fmt: skip
    result = CliRunner().invoke(bench_app, args)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    assert data["baseline"] == "two"
    assert [t["name"] for t in data["targets"]] == ["one", "two"]
    for target in data["targets"]:
        assert target["error"] is None and target["setup"]["kind"] == "attach"
        (phase,) = target["phases"]
        assert phase["arrival"]["label"] == "burst=5/0s"
        assert [r["prompt_tokens"] for r in phase["requests"]] == [24] * 5
    assert "Ratios vs `two`" in (out / "report.md").read_text()
    assert not list(out.glob("*.png"))
