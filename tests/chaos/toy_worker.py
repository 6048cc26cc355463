"""A toy worker process (tests/unit/fake_lm.py behind real gRPC) for the chaos suite's
fast mode (PDSERVE_CHAOS_TOY=1): real processes, real signals, no engine. SIGTERM drains
like a real worker: report draining, refuse new streams, finish running ones, exit 0."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

from pdserve.v1 import worker_pb2 as pb
from tests.e2e.prompts import MAX_MODEL_LEN
from tests.unit.fake_lm import ToyWorker, serve_toy_at

ROLES = {"prefill": pb.ROLE_PREFILL, "decode": pb.ROLE_DECODE, "both": pb.ROLE_BOTH}


async def main(
    role: str,
    port: int,
    model: str,
    worker_id: str,
    drain_timeout_s: float,
    token_delay_s: float = 0.02,
) -> None:
    worker = ToyWorker(ROLES[role], model, worker_id, max_model_len=MAX_MODEL_LEN)
    worker.token_delay_s = token_delay_s  # 0.02: streams of ~50 tokens last about a second
    server = await serve_toy_at(worker, f"127.0.0.1:{port}")
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    worker.draining = True
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(worker.idle.wait(), drain_timeout_s)
    await server.stop(1.0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--role", required=True, choices=sorted(ROLES))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--served-model-name", required=True)
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--drain-timeout-s", type=float, default=30.0)
    parser.add_argument("--token-delay-s", type=float, default=0.02)
    args = parser.parse_args()
    asyncio.run(
        main(
            args.role,
            args.port,
            args.served_model_name,
            args.worker_id,
            args.drain_timeout_s,
            args.token_delay_s,
        )
    )
