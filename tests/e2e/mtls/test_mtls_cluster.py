"""Mutual TLS end to end: a disaggregated request over mTLS links (router -> workers,
decode -> prefill KV over gRPC inside the engine processes) returns exactly plain vLLM's
tokens; clients without a certificate from the CA reach neither the Worker API nor the KV
port; the health-only port answers probes in plaintext. Tenants' prefix caches are apart."""

from __future__ import annotations

import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve.router.tenancy import TENANT_HEADER
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


def _cached_tokens(route: str) -> int:
    """The router's prefix-cache estimate for the chosen worker, from x-pdserve-route."""
    fields = dict(part.strip().split("=", 1) for part in route.split(";")[1:])
    return int(fields["cached_tokens"])


def test_tenants_do_not_share_cached_prefixes(tls_cluster: TlsCluster) -> None:
    """With --tenant-isolation the engines salt their prefix caches per tenant and the
    router salts its block hashes the same way: a tenant's repeat of its own prompt is a
    prefix hit (the router found the engine's salted blocks through the KV events), while
    the same prompt from another tenant, or from no tenant, hits nothing."""
    # About 350 tokens of the tiny model: two full KV blocks of 128, within the context.
    words = [
        "tenant",
        "isolation",
        "keeps",
        "every",
        "prefix",
        "cache",
        "apart",
        "from",
        "the",
        "others",
    ]
    prompt = " ".join(words[i % len(words)] for i in range(80))
    body = {"model": SERVED_NAME, "prompt": prompt, "max_tokens": 2, "temperature": 0}
    url = f"{tls_cluster.cluster.http}/v1/completions"

    def send(tenant: str | None) -> tuple[int, str]:
        headers = {TENANT_HEADER: tenant} if tenant else {}
        reply = httpx.post(url, json=body, headers=headers, timeout=120)
        assert reply.status_code == 200, reply.text
        return _cached_tokens(reply.headers["x-pdserve-route"]), reply.json()["choices"][0]["text"]

    first, text = send("alice")
    assert first == 0  # a prompt nobody sent before
    deadline = time.monotonic() + 20
    again = 0
    while again == 0 and time.monotonic() < deadline:
        time.sleep(0.5)  # the engine's KV events reach the router's index
        again, repeat_text = send("alice")
        assert repeat_text == text
    assert again > 0, "alice's own prefix was never found"
    other, other_text = send("bob")
    anonymous, _ = send(None)
    assert other == 0 and anonymous == 0
    assert other_text == text  # isolation changes caching, never the answer
