"""The prompts every equality test uses: varied lengths, from one token to near the context."""

from __future__ import annotations

MAX_MODEL_LEN = 512
SERVED_NAME = "tiny-llama"

_WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "the",
    "lazy",
    "dog",
    "distributed",
    "systems",
    "must",
    "tolerate",
    "partial",
    "failures",
    "and",
    "network",
    "partitions",
    "prefill",
    "computes",
    "the",
    "prompt",
    "key",
    "value",
    "cache",
    "decode",
    "generates",
    "one",
    "token",
    "at",
    "a",
    "time",
]


def _text(n_words: int, offset: int) -> str:
    return " ".join(_WORDS[(offset + i * 7) % len(_WORDS)] for i in range(n_words))


# (prompt, max_tokens): short (under one KV block), a few blocks, long, and near the
# 512-token context (the prompt plus max_tokens stays inside it).
COMPLETION_CASES: list[tuple[str, int]] = [
    ("The", 16),
    ("Prefill", 16),
    ("The quick brown fox", 16),
    ("Distributed systems", 12),
    ("decode generates one token at a time", 16),
    *[(_text(n, n), 16) for n in (12, 20, 33, 48, 64, 80, 100, 128, 150, 180, 220)],
    *[(_text(n, 3), 24) for n in (260, 300)],
    *[(_text(n, 5), 8) for n in (330, 360, 380, 395)],
]

CHAT_CASES: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": _text(40, 2)},
    ],
    [
        {"role": "user", "content": _text(10, 1)},
        {"role": "assistant", "content": _text(12, 4)},
        {"role": "user", "content": _text(120, 6)},
    ],
]
CHAT_MAX_TOKENS = 16
