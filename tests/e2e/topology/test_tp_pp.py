"""Prefill TP=2 -> NIXL -> decode PP=2 gives plain vLLM's greedy tokens, under concurrency."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.e2e.conftest import Cluster, Reference, chat_answer, completion_answer
from tests.e2e.prompts import CHAT_CASES, COMPLETION_CASES

pytestmark = pytest.mark.e2e


def _late_notifications(cluster: Cluster) -> float:
    text = httpx.get(f"http://127.0.0.1:{cluster.metrics_ports['prefill-0']}/metrics").text
    name = "vllm:nixl_num_notifications_after_expiry_total"
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_tp2_prefill_pp2_decode_match_plain_vllm(
    parallel_cluster: Cluster, reference: Reference
) -> None:
    client = parallel_cluster.openai()
    indexes = list(range(len(COMPLETION_CASES)))
    # Concurrent requests make the prefill engine reuse freed blocks quickly: if it freed
    # a request's blocks before every decode pipeline stage had read them, tokens differ.
    with ThreadPoolExecutor(max_workers=2) as pool:
        answers = list(pool.map(lambda i: completion_answer(client, *COMPLETION_CASES[i]), indexes))
    for index, answer in zip(indexes, answers, strict=True):
        assert answer == reference.completions[index], f"case {index}"
    assert chat_answer(client, CHAT_CASES[1]) == reference.chats[1]
    # Every decode stage's read was counted before the blocks were freed.
    assert _late_notifications(parallel_cluster) == 0
