"""Prefill PP=2 -> gRPC KV -> decode TP=2, and TP=2 -> PP=2, give plain vLLM's greedy tokens."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.e2e.conftest import Cluster, Reference, chat_answer, completion_answer
from tests.e2e.prompts import CHAT_CASES, COMPLETION_CASES

pytestmark = pytest.mark.e2e


def _sum(cluster: Cluster, worker: str, name: str) -> float:
    port = cluster.metrics_ports[worker]
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_heterogeneous_shapes_over_grpc_match_plain_vllm(
    grpc_parallel_cluster: Cluster, reference: Reference
) -> None:
    cluster = grpc_parallel_cluster
    client = cluster.openai()
    indexes = list(range(len(COMPLETION_CASES)))
    with ThreadPoolExecutor(max_workers=2) as pool:
        answers = list(pool.map(lambda i: completion_answer(client, *COMPLETION_CASES[i]), indexes))
    for index, answer in zip(indexes, answers, strict=True):
        assert answer.token_ids == reference.completions[index].token_ids, f"case {index}"
    assert chat_answer(client, CHAT_CASES[1]).token_ids == reference.chats[1].token_ids
    # The KV really moved over gRPC (summed over each side's ranks), and both sides agree.
    sent = _sum(cluster, "prefill-0", "pdserve_kv_transfer_bytes_sent_total")
    received = _sum(cluster, "decode-0", "pdserve_kv_transfer_bytes_received_total")
    assert sent > 0 and sent == received
    assert _sum(cluster, "decode-0", "pdserve_kv_transfer_failures_total") == 0
