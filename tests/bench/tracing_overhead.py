"""Micro-benchmark: what tracing costs the router's request path (not a test).

    python -m tests.bench.tracing_overhead [--requests 300] [--rounds 5] [--out FILE]

Two measurements, both in this process with no engine:

1. hooks: the tracing calls one disaggregated request makes on the router (root span,
   tokenize and schedule spans, two worker-call spans, request id, log context), timed
   in a tight loop with tracing off (the default) and on (ring only, no exporter).
2. path: whole requests through the router's HTTP app (ASGI, in process) over real gRPC
   to fake workers (tests/unit/fake_worker.py), rounds interleaved so load drifts hit
   every mode alike: tracing off, tracing on (timeline ring), and -- when
   ``--baseline-tree`` names an export of the code before tracing existed -- that code.
   The baseline runs in a subprocess with that tree first on sys.path.

Prints JSON: per mode the median and mean microseconds per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

MODEL = "fake-model"


def hook_cost(iterations: int, enabled: bool, hooks: bool = True) -> float:
    """Microseconds per request of a loop making the router's tracing calls for one
    disaggregated request (``hooks=False``: the same loop without them, to subtract)."""
    from pdserve.config import TracingConfig
    from pdserve.logs import request_id_from, set_request_context
    from pdserve.router.request_trace import WorkerCallSpan
    from pdserve.router.timeline import TimelineRing
    from pdserve.router.workers import WorkerClient
    from pdserve.tracing import Tracing
    from pdserve.v1 import worker_pb2 as pb

    processors = [TimelineRing(256)] if enabled else []
    tracing = Tracing.create(TracingConfig(), "pdserve-router", processors)
    worker = WorkerClient.__new__(WorkerClient)  # only .name/.address are read
    worker.address, worker.info = "127.0.0.1:1", None
    headers = {"x-request-id": "bench-1", "content-type": "application/json"}
    msg = pb.WorkerGenerateResponse(text="x", token_ids=[1])

    class _Call:
        async def trailing_metadata(self) -> tuple[()]:
            return ()

    async def bare() -> None:
        for _ in (pb.STAGE_PREFILL, pb.STAGE_DECODE):
            for _ in range(4):
                await _noop(msg, _Call())
            await _noop(msg, _Call())

    async def one() -> None:
        rid = request_id_from(headers.get("x-request-id"))
        trace = tracing.start_request("POST /v1/completions", headers, {"pdserve.request_id": rid})
        set_request_context(rid, trace.trace_id)
        with trace.span("tokenize"):
            pass
        with trace.span("schedule") as span:
            if span.is_recording():
                span.set_attributes({"pdserve.mode": "disaggregated"})
        for stage in (pb.STAGE_PREFILL, pb.STAGE_DECODE):
            call_span = WorkerCallSpan.start(trace, worker, stage)
            call_span.metadata()
            for _ in range(4):
                await call_span.on_response(msg, _Call())
            await call_span.on_done(_Call())
            call_span.end()
        trace.set("pdserve.prompt_tokens", 5)
        trace.end()

    async def loop() -> float:
        start = time.perf_counter()
        body = one if hooks else bare
        for _ in range(iterations):
            await body()
        return (time.perf_counter() - start) / iterations * 1e6

    return asyncio.run(loop())


async def _noop(*args: object) -> None:
    pass


async def _path_round(requests: int, tracing_on: bool) -> list[float]:
    """Per-request latency (us) of `requests` sequential completions through the app."""
    import httpx

    from pdserve.models import resolve_model
    from pdserve.router.api.http import build_http_app
    from pdserve.router.tokenize import PromptTokenizer
    from pdserve.v1 import worker_pb2 as pb
    from tests.unit.fake_worker import FakeWorker, fake_router

    prefill, decode = FakeWorker(pb.ROLE_PREFILL, MODEL), FakeWorker(pb.ROLE_DECODE, MODEL)
    tokenizer = PromptTokenizer(str(resolve_model("tiny")))
    extra: list[Any] = []
    if tracing_on:
        from pdserve.config import TracingConfig
        from pdserve.router.timeline import TimelineRing
        from pdserve.tracing import Tracing

        ring = TimelineRing(256)
        extra = [Tracing.create(TracingConfig(), "pdserve-router", [ring]), ring]
    body = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 3}
    latencies = []
    async with fake_router(prefill, decode, MODEL, poll_interval_s=60) as router:
        app = build_http_app(
            router.service,
            tokenizer,
            router.metrics.registry,
            router.planner.can_serve,
            4096,
            *extra,
        )
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
            for i in range(requests + 10):
                start = time.perf_counter()
                r = await client.post("/v1/completions", json=body)
                elapsed = (time.perf_counter() - start) * 1e6
                assert r.status_code == 200, r.text
                if i >= 10:  # warm-up
                    latencies.append(elapsed)
    return latencies


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "median_us": round(statistics.median(values), 1),
        "mean_us": round(statistics.fmean(values), 1),
        "n": len(values),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--hook-iterations", type=int, default=20000)
    parser.add_argument("--baseline-tree", help="export of the code before tracing")
    parser.add_argument("--one-round", choices=["off", "on"], help=argparse.SUPPRESS)
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.one_round:  # a baseline subprocess: one round, latencies as JSON
        print(json.dumps(asyncio.run(_path_round(args.requests, args.one_round == "on"))))
        return
    # Best of 5 (the least disturbed by other load), minus the same loop without hooks.
    bare = min(hook_cost(args.hook_iterations, False, hooks=False) for _ in range(5))
    off = min(hook_cost(args.hook_iterations, False) for _ in range(5))
    on = min(hook_cost(args.hook_iterations // 4, True) for _ in range(5))
    result: dict[str, Any] = {
        "hooks_us_per_request": {
            "off": round(off - bare, 2),
            "on_ring_only": round(on - bare, 2),
            "loop_without_hooks": round(bare, 2),
        }
    }
    modes: dict[str, list[float]] = {"off": [], "on_ring_only": []}
    if args.baseline_tree:
        modes["baseline_no_tracing_code"] = []
    for _ in range(args.rounds):
        modes["off"] += asyncio.run(_path_round(args.requests, False))
        modes["on_ring_only"] += asyncio.run(_path_round(args.requests, True))
        if args.baseline_tree:
            env = {**os.environ, "PYTHONPATH": f"{args.baseline_tree}:{os.getcwd()}"}
            argv = [sys.executable, "-m", "tests.bench.tracing_overhead", "--one-round", "off"]
            argv += ["--requests", str(args.requests)]
            out = subprocess.run(
                argv, env=env, cwd=args.baseline_tree, capture_output=True, text=True, check=True
            )
            modes["baseline_no_tracing_code"] += json.loads(out.stdout.splitlines()[-1])
    result["path_us_per_request"] = {name: _summary(v) for name, v in modes.items()}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
