"""Prefill TP=2 -> NIXL -> decode PP=2 gives plain vLLM's greedy tokens."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import Cluster, Reference, chat_answer, completion_answer
from tests.e2e.prompts import CHAT_CASES, COMPLETION_CASES

pytestmark = pytest.mark.e2e


def test_tp2_prefill_pp2_decode_match_plain_vllm(
    parallel_cluster: Cluster, reference: Reference
) -> None:
    client = parallel_cluster.openai()
    for index in range(0, len(COMPLETION_CASES), 2):
        prompt, max_tokens = COMPLETION_CASES[index]
        assert completion_answer(client, prompt, max_tokens) == reference.completions[index]
    assert chat_answer(client, CHAT_CASES[1]) == reference.chats[1]
