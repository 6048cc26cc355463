"""Cumulative KV-transfer counters of one engine rank (thread-safe).

They live in the engine process, where the connector runs; the worker process reads them
over the KvTransfer.Stats RPC and exports them (pdserve/metrics.py names them).
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter

from pdserve.metrics import KV_TRANSFER_BUCKETS
from pdserve.v1 import kv_transfer_pb2 as pb


class TransferStats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bytes_sent = 0
        self.bytes_received = 0
        self.shm_bytes_received = 0
        self.lease_expirations = 0
        self.transfers = 0
        self.failures: Counter[str] = Counter()
        self._bounds = tuple(KV_TRANSFER_BUCKETS)
        self._counts = [0] * (len(self._bounds) + 1)  # last: +Inf
        self._latency_sum = 0.0

    def sent(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_sent += nbytes

    def received(self, nbytes: int, seconds: float, shm_nbytes: int = 0) -> None:
        with self._lock:
            self.bytes_received += nbytes
            self.shm_bytes_received += shm_nbytes
            self.transfers += 1
            self._counts[bisect.bisect_left(self._bounds, seconds)] += 1
            self._latency_sum += seconds

    def failed(self, reason: str) -> None:
        with self._lock:
            self.failures[reason] += 1

    def expired(self, count: int = 1) -> None:
        with self._lock:
            self.lease_expirations += count

    def to_proto(self, staged: tuple[int, int, int]) -> pb.KvTransferStats:
        requests, blocks, nbytes = staged
        with self._lock:
            cumulative, running = [], 0
            for count in self._counts:
                running += count
                cumulative.append(running)
            return pb.KvTransferStats(
                bytes_sent=self.bytes_sent,
                bytes_received=self.bytes_received,
                shm_bytes_received=self.shm_bytes_received,
                staged_blocks=blocks,
                staged_bytes=nbytes,
                staged_requests=requests,
                lease_expirations=self.lease_expirations,
                transfers=self.transfers,
                failures=dict(self.failures),
                latency_bucket_bounds=[*self._bounds, float("inf")],
                latency_bucket_counts=cumulative,
                latency_sum_s=self._latency_sum,
            )
