"""Exports the grpc KV transport's counters on the worker's /metrics.

The counters live in the engine ranks (where the connector runs); on each scrape this
collector asks every local rank's KvTransfer.Stats and sums them. A rank that does not
answer (engine starting or gone) contributes nothing to that scrape.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import grpc
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from pdserve import metrics as names
from pdserve.config import TlsConfig
from pdserve.tls import sync_channel
from pdserve.v1 import kv_transfer_pb2 as pb
from pdserve.v1 import kv_transfer_pb2_grpc as pb_grpc

STATS_TIMEOUT_S = 1.0


def merge(stats: Sequence[pb.KvTransferStats]) -> pb.KvTransferStats:
    """Sum the counters of several ranks (histograms bucket by bucket)."""
    total = pb.KvTransferStats()
    for s in stats:
        total.bytes_sent += s.bytes_sent
        total.bytes_received += s.bytes_received
        total.shm_bytes_received += s.shm_bytes_received
        total.staged_blocks += s.staged_blocks
        total.staged_bytes += s.staged_bytes
        total.staged_requests += s.staged_requests
        total.lease_expirations += s.lease_expirations
        total.transfers += s.transfers
        for reason, count in s.failures.items():
            total.failures[reason] += count
        if not total.latency_bucket_bounds:
            total.latency_bucket_bounds.extend(s.latency_bucket_bounds)
            total.latency_bucket_counts.extend([0] * len(s.latency_bucket_counts))
        for i, count in enumerate(s.latency_bucket_counts):
            total.latency_bucket_counts[i] += count
        total.latency_sum_s += s.latency_sum_s
    return total


def families(role: str, s: pb.KvTransferStats) -> list[Metric]:
    def counter(name: str, doc: str, value: float) -> Metric:
        family = CounterMetricFamily(name.removesuffix("_total"), doc, labels=["role"])
        family.add_metric([role], value)
        return family

    def gauge(name: str, doc: str, value: float) -> Metric:
        family = GaugeMetricFamily(name, doc, labels=["role"])
        family.add_metric([role], value)
        return family

    failures = CounterMetricFamily(
        names.KV_TRANSFER_FAILURES.removesuffix("_total"),
        "KV fetches that failed on this (consumer) worker, by reason.",
        labels=["role", "reason"],
    )
    for reason, count in sorted(s.failures.items()):
        failures.add_metric([role, reason], count)
    latency = HistogramMetricFamily(
        names.KV_TRANSFER_DURATION,
        "Time to fetch, verify and store one request's KV (consumer side).",
        labels=["role"],
    )
    buckets = [
        ("+Inf" if bound == float("inf") else repr(bound), count)
        for bound, count in zip(s.latency_bucket_bounds, s.latency_bucket_counts, strict=True)
    ]
    latency.add_metric([role], buckets, s.latency_sum_s)
    return [
        counter(
            names.KV_TRANSFER_BYTES_SENT, "KV payload bytes sent to decode workers.", s.bytes_sent
        ),
        counter(
            names.KV_TRANSFER_BYTES_RECEIVED,
            "KV payload bytes received from prefill workers.",
            s.bytes_received,
        ),
        counter(
            names.KV_TRANSFER_SHM_BYTES_RECEIVED,
            "The part of the KV bytes received that was read from a same-host prefill "
            "worker's /dev/shm instead of the socket (ADR 0015).",
            s.shm_bytes_received,
        ),
        gauge(
            names.KV_TRANSFER_STAGED_BLOCKS,
            "Blocks staged for remote decodes (summed over engine ranks).",
            s.staged_blocks,
        ),
        gauge(
            names.KV_TRANSFER_STAGED_REQUESTS,
            "Requests with KV staged for a remote decode (summed over engine ranks).",
            s.staged_requests,
        ),
        counter(
            names.KV_TRANSFER_LEASE_EXPIRATIONS,
            "Staged KV freed because its lease ran out before the decode side confirmed.",
            s.lease_expirations,
        ),
        failures,
        latency,
    ]


class KvTransferCollector(Collector):
    def __init__(
        self, role: str, host: str, port: int, ranks: int, tls: TlsConfig | None = None
    ) -> None:
        self.role = role
        self._stubs = [
            pb_grpc.KvTransferStub(sync_channel(f"{host}:{port + rank}", tls))
            for rank in range(ranks)
        ]

    def collect(self) -> Iterator[Metric]:
        answers = []
        for stub in self._stubs:
            try:
                answers.append(stub.Stats(pb.StatsRequest(), timeout=STATS_TIMEOUT_S))
            except grpc.RpcError:
                continue
        if answers:
            yield from families(self.role, merge(answers))
