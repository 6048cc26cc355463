"""Scheduling overhead with many workers: the router's planning time per request.

Fake workers (no engines, no network) in a real pool, a real exact prefix index filled
with system prompts spread over the workers, and the real planner with ``kv_aware`` on
both pools and the auto disaggregation decision. Measures ``Planner.plan`` per request
(block hashing, filters, scorers, picker, decision, commit), which is all the router
adds to a request before the first worker call.

    python -m pdserve.bench.scheduling --workers 500
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from typing import Any

from prometheus_client import CollectorRegistry

from pdserve.config import Role
from pdserve.metrics import RoutingMetrics
from pdserve.router.kv_index.hashing import BlockHasher
from pdserve.router.routing import Routing
from pdserve.router.workers import WorkerClient, WorkerPool
from pdserve.scheduling_config import (
    DisaggregationConfig,
    DisaggregationMode,
    PolicyConfig,
    SchedulingConfig,
)
from pdserve.v1 import worker_pb2 as pb

BLOCK_SIZE = 16


def fake_workers(n: int, prefill_share: float, rng: random.Random) -> list[WorkerClient]:
    layout = pb.KvHandle(
        model_id="m",
        dtype="bfloat16",
        block_size=BLOCK_SIZE,
        num_layers=32,
        num_kv_heads=8,
        head_size=128,
        hash_algorithm="vllm-sha256_cbor",
    )
    workers = []
    n_prefill = max(1, int(n * prefill_share))
    for i in range(n):
        role = Role.PREFILL if i < n_prefill else Role.DECODE
        w = WorkerClient(f"10.0.{i // 250}.{i % 250}:50100", role, None, None)
        w.healthy = True
        w.info = pb.WorkerInfo(worker_id=f"{role.value}-{i}", model_id="m", kv_layout=layout)
        w.load = pb.LoadReport(
            running_requests=rng.randrange(0, 16),
            waiting_requests=rng.randrange(0, 4),
            kv_cache_usage=rng.random(),
        )
        workers.append(w)
    return workers


def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    pool = WorkerPool("m", rpc_timeout_s=1, poll_interval_s=1)
    pool.workers = fake_workers(args.workers, args.prefill_share, rng)
    config = SchedulingConfig(
        prefill=PolicyConfig("kv_aware"),
        decode=PolicyConfig("kv_aware"),
        disaggregation=DisaggregationConfig(mode=DisaggregationMode(args.disaggregation)),
    )
    metrics = RoutingMetrics(CollectorRegistry())
    routing = Routing(config, pool, metrics, "m", rng)
    hasher = BlockHasher(BLOCK_SIZE, "sha256_cbor")
    routing.events.use_hasher(hasher)
    index = routing.events.index
    # System prompts, each cached on a few workers; plus unrelated blocks everywhere.
    prompts = [
        [rng.randrange(3, 50000) for _ in range(args.prefix_tokens)] for _ in range(args.prefixes)
    ]
    for prompt in prompts:
        hashes = hasher.block_hashes(prompt)
        for w in rng.sample(pool.workers, args.holders):
            index.store(w.address, hashes)
    for w in pool.workers:
        index.store(w.address, (rng.getrandbits(64) for _ in range(args.noise_blocks)))
    requests = [
        rng.choice(prompts) + [rng.randrange(3, 50000) for _ in range(args.user_tokens)]
        for _ in range(args.requests)
    ]
    for prompt in requests[:50]:  # warm-up
        routing.planner.plan(prompt)
    plan_s, plan_cpu_s, hash_s = [], [], []
    for prompt in requests:
        started, started_cpu = time.perf_counter(), time.thread_time()
        routing.planner.plan(prompt, session_key=None)
        plan_cpu_s.append(time.thread_time() - started_cpu)
        plan_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        hasher.block_hashes(prompt)
        hash_s.append(time.perf_counter() - started)

    def pct(values: list[float], q: float) -> float:
        return statistics.quantiles(values, n=100)[int(q) - 1] * 1e3

    return {
        "workers": args.workers,
        "index_blocks": index.size,
        "prompt_tokens": args.prefix_tokens + args.user_tokens,
        "requests": args.requests,
        # Wall time includes waiting for a core on a busy machine; CPU time does not.
        "plan_ms": {q: round(pct(plan_s, q), 3) for q in (50, 90, 99)},
        "plan_cpu_ms": {q: round(pct(plan_cpu_s, q), 3) for q in (50, 90, 99)},
        "block_hashing_ms": {q: round(pct(hash_s, q), 3) for q in (50, 90, 99)},
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=500)
    parser.add_argument("--prefill-share", type=float, default=0.2)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--prefixes", type=int, default=64, help="distinct system prompts")
    parser.add_argument("--holders", type=int, default=8, help="workers caching each prompt")
    parser.add_argument("--prefix-tokens", type=int, default=1024)
    parser.add_argument("--user-tokens", type=int, default=256)
    parser.add_argument("--noise-blocks", type=int, default=500, help="other blocks per worker")
    parser.add_argument("--disaggregation", default="auto", choices=["always", "never", "auto"])
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> None:
    print(json.dumps(run(build_parser().parse_args(argv)), indent=2))


if __name__ == "__main__":
    main()
