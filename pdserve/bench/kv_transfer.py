"""``pdserve bench kv-transfer``: the grpc KV transport vs NIXL on loopback, same run.

gRPC: a KvTransfer server in a child process (as in a prefill engine rank) holds one
staged request per size, staged as the connector does (into /dev/shm); this process
fetches it with the real consumer code (chunks, hash verification, assembly into the
rank's reused receive buffer, then a scatter into a paged cache by block id), so the
figure is what a decode rank sees. Twice: ``grpc`` with the bytes over the socket (as
between hosts), ``grpc-shm`` through the same-host shared-memory path.
NIXL: two agents (UCX backend) in this process; one WRITE of the same bytes per
transfer, handle creation included (vLLM creates one per request). Both move host
memory over loopback; both are timed from request to the last byte usable.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

MIB = 1024 * 1024
# A staged slice: [blocks, heads, block_size, entry] float32 = 64 KiB per block.
_HEADS, _BLOCK, _ENTRY = 8, 16, 128
_BLOCK_BYTES = _HEADS * _BLOCK * _ENTRY * 4


@dataclass(frozen=True)
class SizeResult:
    transport: str
    size_bytes: int
    repeats: int
    gbps_median: float
    latency_p50_s: float
    latency_p90_s: float
    latency_p99_s: float
    latency_min_s: float


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarize(transport: str, size: int, seconds: list[float]) -> SizeResult:
    p50 = statistics.median(seconds)
    return SizeResult(
        transport=transport,
        size_bytes=size,
        repeats=len(seconds),
        gbps_median=size / p50 / 1e9,
        latency_p50_s=p50,
        latency_p90_s=_percentile(seconds, 0.9),
        latency_p99_s=_percentile(seconds, 0.99),
        latency_min_s=min(seconds),
    )


def _time(run: Callable[[], None], repeats: int) -> list[float]:
    run()  # warm-up: connections, registrations, allocator
    out = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        out.append(time.perf_counter() - started)
    return out


def serve_staged(port: int, sizes_mib: list[int]) -> None:
    """Child process: stage one request per size and serve until stdin closes."""
    from pdserve.kv_transfer.grpc_server import KvTransferServer, RankLayout
    from pdserve.kv_transfer.shm import BlockStager

    server = KvTransferServer("127.0.0.1", port, 3600.0, RankLayout("float32", _BLOCK, 64))
    stager = BlockStager(shared=True)
    for size in sizes_mib:
        blocks = size * MIB // _BLOCK_BYTES
        paged = {0: torch.rand(blocks, _HEADS, _BLOCK, _ENTRY)}
        layers, buffer = stager.stage(paged, torch.arange(blocks))
        server.staging.put(f"size-{size}", layers, 0, _HEADS, buffer)
    server.start()
    print("ready", flush=True)
    sys.stdin.read()
    server.stop()


def bench_grpc(port: int, sizes_mib: list[int], repeats: int, chunk_bytes: int) -> list[SizeResult]:
    from pdserve.kv_transfer.chunks import ReceiveArena
    from pdserve.kv_transfer.grpc_client import ConsumerLayout, KvFetcher, SliceRequest

    child = subprocess.Popen(
        [sys.executable, "-m", "pdserve.bench.kv_transfer", str(port), *map(str, sizes_mib)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        if child.stdout.readline().strip() != "ready":
            raise RuntimeError("the KV transfer server did not start")
        layout = ConsumerLayout(torch.float32, _BLOCK, 64)
        # As a decode rank: received KV lands in memory faulted in once (its arena, or
        # in place in /dev/shm), then is scattered into the paged cache by block id, as
        # the connector does; NIXL below writes into its registered destination directly.
        arena = ReceiveArena(max_bytes=max(sizes_mib) * MIB)
        cache = torch.zeros(max(sizes_mib) * MIB // _BLOCK_BYTES, _HEADS, _BLOCK, _ENTRY)
        results = []
        for name, shared in (("grpc", False), ("grpc-shm", True)):
            fetcher = KvFetcher(layout, timeout_s=300, shared_memory=shared)
            for size in sizes_mib:
                blocks = size * MIB // _BLOCK_BYTES
                want = SliceRequest(f"size-{size}", 0, blocks, (0,), 0, _HEADS, chunk_bytes)

                def fetch(
                    want: SliceRequest = want, fetcher: KvFetcher = fetcher, size: int = size
                ) -> None:
                    arena.reset(size * MIB)
                    got = fetcher.fetch(f"127.0.0.1:{port}", want, arena)
                    index = torch.arange(want.num_blocks)
                    cache[index, 0:_HEADS] = got.slices[(0, 0, _HEADS)]

                results.append(summarize(name, size * MIB, _time(fetch, repeats)))
        return results
    finally:
        if child.stdin is not None:
            child.stdin.close()
        child.wait(timeout=30)


def bench_nixl(sizes_mib: list[int], repeats: int) -> list[SizeResult]:
    from nixl._api import nixl_agent, nixl_agent_config

    config = nixl_agent_config(backends=["UCX"])
    sender, receiver = nixl_agent("bench-src", config), nixl_agent("bench-dst", config)
    peer = sender.add_remote_agent(receiver.get_agent_metadata())
    results = []
    for size in sizes_mib:
        src = torch.rand(size * MIB // 4)
        dst = torch.zeros_like(src)
        sender.register_memory(src)
        receiver.register_memory(dst)
        # The receiver's registration must be known to the sender before it can write.
        peer = sender.add_remote_agent(receiver.get_agent_metadata())
        src_descs, dst_descs = sender.get_xfer_descs(src), receiver.get_xfer_descs(dst)

        def write(
            src_descs: object = src_descs, dst_descs: object = dst_descs, peer: str = peer
        ) -> None:
            handle = sender.initialize_xfer("WRITE", src_descs, dst_descs, peer, b"bench")
            sender.transfer(handle)
            while (state := sender.check_xfer_state(handle)) not in ("DONE", "ERR"):
                pass
            sender.release_xfer_handle(handle)
            if state == "ERR":
                raise RuntimeError("NIXL transfer failed")

        results.append(summarize("nixl", size * MIB, _time(write, repeats)))
        if not torch.equal(src, dst):
            raise RuntimeError("NIXL moved wrong bytes")
        sender.deregister_memory(sender.get_reg_descs(src))
        receiver.deregister_memory(receiver.get_reg_descs(dst))
    return results


def plot(results: list[SizeResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for transport in sorted({r.transport for r in results}):
        rows = [r for r in results if r.transport == transport]
        sizes = [r.size_bytes / MIB for r in rows]
        left.plot(sizes, [r.gbps_median for r in rows], marker="o", label=transport)
        right.plot(sizes, [r.latency_p50_s * 1000 for r in rows], marker="o", label=transport)
    for ax, label in ((left, "GB/s (median)"), (right, "latency p50 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("transfer size (MiB)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend()
    right.set_yscale("log")
    fig.suptitle("KV transfer on one host: gRPC (pdserve; socket, /dev/shm) vs NIXL (UCX)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(
    out: Path, sizes_mib: list[int], repeats: int, port: int, chunk_bytes: int, nixl: bool
) -> list[SizeResult]:
    results = bench_grpc(port, sizes_mib, repeats, chunk_bytes)
    if nixl:
        results += bench_nixl(sizes_mib, repeats)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "sizes_mib": sizes_mib,
        "repeats": repeats,
        "chunk_bytes": chunk_bytes,
        "results": [asdict(r) for r in results],
    }
    (out / "kv_transfer.json").write_text(json.dumps(payload, indent=2))
    plot(results, out / "kv_transfer.png")
    return results


if __name__ == "__main__":
    serve_staged(int(sys.argv[1]), [int(s) for s in sys.argv[2:]])
