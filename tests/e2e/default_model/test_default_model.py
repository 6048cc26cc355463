"""Greedy tokens of the default model through pdserve (gRPC KV) equal plain vLLM's."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import completion_answer
from tests.e2e.default_model.conftest import CASES, SERVED, DefaultModelRun

pytestmark = pytest.mark.e2e


def test_default_model_over_grpc_kv_matches_plain_vllm(default_model_run: DefaultModelRun) -> None:
    client = default_model_run.cluster.openai()
    for index, (prompt, max_tokens) in enumerate(CASES):
        answer = completion_answer(client, prompt, max_tokens, model=SERVED)
        want = default_model_run.reference[index]
        assert answer.token_ids == want.token_ids, f"case {index}: {answer.text!r} vs {want.text!r}"
        assert answer.finish_reason == want.finish_reason
