"""Mutual TLS end to end: a disaggregated request over mTLS links (router -> workers,
decode -> prefill KV over gRPC inside the engine processes) returns exactly plain vLLM's
tokens; clients without a certificate from the CA reach neither the Worker API nor the KV
port; the health-only port answers probes in plaintext."""

from __future__ import annotations

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve.tls import sync_channel
from pdserve.v1 import kv_transfer_pb2 as kvpb
from pdserve.v1 import kv_transfer_pb2_grpc as kvgrpc
from pdserve.v1 import worker_pb2 as wpb
from pdserve.v1 import worker_pb2_grpc as wgrpc
from tests.e2e.conftest import Reference, completion_answer
from tests.e2e.mtls.conftest import WORKERS, TlsCluster
from tests.e2e.prompts import COMPLETION_CASES, SERVED_NAME

pytestmark = pytest.mark.e2e

CASES = range(6)


def _received(cluster: TlsCluster) -> float:
    port = cluster.cluster.metrics_ports["decode-0"]
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("pdserve_kv_transfer_bytes_received_total")
    )


def test_disaggregated_tokens_identical_over_mtls(
    tls_cluster: TlsCluster, reference: Reference
) -> None:
    before = _received(tls_cluster)
    client = tls_cluster.cluster.openai()
    for i in CASES:
        prompt, max_tokens = COMPLETION_CASES[i]
        got = completion_answer(client, prompt, max_tokens)
        assert got.token_ids == reference.completions[i].token_ids, (i, prompt[:40])
    body = {"model": SERVED_NAME, "prompt": "mutual tls route check", "max_tokens": 2}
    reply = httpx.post(f"{tls_cluster.cluster.http}/v1/completions", json=body, timeout=120)
    assert reply.headers["x-pdserve-route"].startswith("disaggregated"), reply.headers
    # The KV came over the (mTLS) gRPC KV stream, not recomputed on the decode side.
    assert _received(tls_cluster) > before


def test_no_certificate_no_access(tls_cluster: TlsCluster) -> None:
    _, worker_port, _, kv_port, health_port = WORKERS["prefill-0"]
    with (
        grpc.insecure_channel(f"127.0.0.1:{worker_port}") as channel,
        pytest.raises(grpc.RpcError) as info,
    ):
        wgrpc.WorkerStub(channel).GetInfo(wpb.GetInfoRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    with (
        grpc.insecure_channel(f"127.0.0.1:{kv_port}") as channel,
        pytest.raises(grpc.RpcError) as kv_info,
    ):
        kvgrpc.KvTransferStub(channel).Stats(kvpb.StatsRequest(), timeout=10)
    assert kv_info.value.code() == grpc.StatusCode.UNAVAILABLE
    # A certificate from the cluster's CA opens both.
    tls = tls_cluster.router_tls
    with sync_channel(f"127.0.0.1:{worker_port}", tls) as channel:
        info_reply = wgrpc.WorkerStub(channel).GetInfo(wpb.GetInfoRequest(), timeout=10)
    assert info_reply.worker_id == "prefill-0"
    with sync_channel(f"127.0.0.1:{kv_port}", tls) as channel:
        kvgrpc.KvTransferStub(channel).Stats(kvpb.StatsRequest(), timeout=10)
    # Probes without a certificate: the plaintext health-only port.
    with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
    assert health.status == health_pb2.HealthCheckResponse.SERVING
