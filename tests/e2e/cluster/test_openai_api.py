"""Through the real openai client: P/D outputs are token-for-token those of plain vLLM."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import Cluster, Reference, chat_answer, completion_answer
from tests.e2e.prompts import CHAT_CASES, CHAT_MAX_TOKENS, COMPLETION_CASES, SERVED_NAME

pytestmark = pytest.mark.e2e


def test_completions_match_plain_vllm(cluster: Cluster, reference: Reference) -> None:
    client = cluster.openai()
    assert len(COMPLETION_CASES) >= 20
    for (prompt, max_tokens), expected in zip(COMPLETION_CASES, reference.completions, strict=True):
        got = completion_answer(client, prompt, max_tokens)
        assert got == expected, f"prompt of {len(prompt.split())} words differs"


def test_chat_matches_plain_vllm(cluster: Cluster, reference: Reference) -> None:
    client = cluster.openai()
    for messages, expected in zip(CHAT_CASES, reference.chats, strict=True):
        assert chat_answer(client, messages) == expected


def test_streaming_completion_matches(cluster: Cluster, reference: Reference) -> None:
    client = cluster.openai()
    for index in (0, 7, len(COMPLETION_CASES) - 1):
        prompt, max_tokens = COMPLETION_CASES[index]
        stream = client.completions.create(
            model=SERVED_NAME,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"return_token_ids": True},
        )
        text, ids, finish, usage = "", [], None, None
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                text += choice.text
                ids += choice.model_extra.get("token_ids") or []
                finish = choice.finish_reason or finish
        expected = reference.completions[index]
        assert (text, ids, finish) == (expected.text, expected.token_ids, expected.finish_reason)
        assert usage is not None and usage.completion_tokens == len(expected.token_ids)


def test_streaming_chat_matches(cluster: Cluster, reference: Reference) -> None:
    client = cluster.openai()
    stream = client.chat.completions.create(
        model=SERVED_NAME,
        messages=CHAT_CASES[1],  # type: ignore[arg-type]
        max_tokens=CHAT_MAX_TOKENS,
        temperature=0,
        stream=True,
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference.chats[1].text
    assert chunks[-1].choices[0].finish_reason == reference.chats[1].finish_reason


def test_stop_strings_and_usage(cluster: Cluster, reference: Reference) -> None:
    """A stop string taken from the reference output ends the text right before it."""
    prompt, max_tokens = COMPLETION_CASES[10]
    full = reference.completions[10].text
    stop = full.strip()[-3:] if len(full.strip()) >= 6 else None
    if not stop:
        pytest.skip("reference output too short to cut")
    r = cluster.openai().completions.create(
        model=SERVED_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0, stop=[stop]
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[: full.index(stop)]
    assert r.usage is not None and r.usage.prompt_tokens > 0


def test_seeded_sampling_is_reproducible(cluster: Cluster) -> None:
    client = cluster.openai()

    def sample() -> str:
        r = client.completions.create(
            model=SERVED_NAME, prompt="The quick", max_tokens=12, temperature=1.0, top_p=0.9,
            seed=1234, extra_body={"top_k": 50},
        )  # fmt: skip
        return r.choices[0].text

    assert sample() == sample()


def test_models_endpoint(cluster: Cluster) -> None:
    models = cluster.openai().models.list()
    assert [m.id for m in models.data] == [SERVED_NAME]
