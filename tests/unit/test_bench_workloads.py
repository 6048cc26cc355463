"""Workload generation: exact token lengths with a real tokenizer, seeds reproducible."""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import replace
from pathlib import Path

import pytest

from pdserve.bench.arrival import (
    ArrivalKind,
    ArrivalSpec,
    parse_burst,
    parse_rates,
    start_offsets,
    sweep,
)
from pdserve.bench.workloads import (
    GroupOrder,
    LengthDist,
    PromptBuilder,
    Tokenizer,
    WorkloadKind,
    WorkloadSpec,
    build_workload,
    load_tokenizer,
)
from pdserve.errors import ConfigError
from pdserve.models import resolve_model

SYNTHETIC = [k for k in WorkloadKind if k is not WorkloadKind.REPLAY]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_tokenizer(str(resolve_model("tiny")))


def count(tokenizer: Tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


@pytest.mark.parametrize("kind", SYNTHETIC)
def test_lengths_are_exact(tokenizer: Tokenizer, kind: WorkloadKind) -> None:
    spec = WorkloadSpec(kind=kind, num_requests=12, seed=1, prefix_len=100, max_context=2048)
    workload = build_workload(spec, tokenizer)
    assert len(workload.requests) == 12
    in_dist, out_dist = spec.lengths()
    for r in workload.requests:
        assert count(tokenizer, r.prompt) == r.prompt_tokens
        assert r.prompt_tokens + r.max_tokens <= spec.max_context
        assert out_dist.low <= r.max_tokens <= out_dist.high
    if kind in (WorkloadKind.RANDOM, WorkloadKind.LONG_INPUT_SHORT_OUTPUT):
        assert all(in_dist.low <= r.prompt_tokens <= in_dist.high for r in workload.requests)


def test_explicit_lengths_and_distributions(tokenizer: Tokenizer) -> None:
    spec = WorkloadSpec(num_requests=20, input_len="37", output_len="5-9", seed=2)
    workload = build_workload(spec, tokenizer)
    assert {r.prompt_tokens for r in workload.requests} == {37}
    assert all(count(tokenizer, r.prompt) == 37 for r in workload.requests)
    assert {r.max_tokens for r in workload.requests} <= set(range(5, 10))
    normal = build_workload(replace(spec, input_len="normal:50,10"), tokenizer)
    lengths = [r.prompt_tokens for r in normal.requests]
    assert len(set(lengths)) > 3 and all(count(tokenizer, r.prompt) == r.prompt_tokens
                                         for r in normal.requests)  # fmt: skip


def test_seeds_reproducible(tokenizer: Tokenizer) -> None:
    for kind in SYNTHETIC:
        spec = WorkloadSpec(kind=kind, num_requests=8, seed=42, prefix_len=64)
        assert build_workload(spec, tokenizer) == build_workload(spec, tokenizer)
        other = build_workload(replace(spec, seed=43), tokenizer)
        assert other.requests != build_workload(spec, tokenizer).requests


def test_shared_prefix_groups(tokenizer: Tokenizer) -> None:
    spec = WorkloadSpec(kind=WorkloadKind.SHARED_PREFIX, num_requests=12, groups=3, prefix_len=80)
    reqs = build_workload(spec, tokenizer).requests
    assert [r.group for r in reqs] == [0, 1, 2] * 4
    ids = {r.request_id: tokenizer.encode(r.prompt, add_special_tokens=False) for r in reqs}
    prefixes: dict[int, list[int]] = {}
    for r in reqs:
        assert r.group is not None
        head = ids[r.request_id][:80]
        assert prefixes.setdefault(r.group, head) == head
        assert len(ids[r.request_id]) == 80 + 32  # default question length
    assert len({tuple(p) for p in prefixes.values()}) == 3


def test_shared_prefix_random_group_order(tokenizer: Tokenizer) -> None:
    spec = WorkloadSpec(kind=WorkloadKind.SHARED_PREFIX, num_requests=32, groups=8, prefix_len=40)
    shuffled = replace(spec, group_order=GroupOrder.RANDOM)
    plain, mixed = build_workload(spec, tokenizer), build_workload(shuffled, tokenizer)
    order = [r.group for r in mixed.requests]
    assert sorted(order) == sorted(r.group for r in plain.requests)  # 4 of each group
    # Not i mod 8: with 2 workers, round robin would keep every group on one worker.
    assert order != [r.group for r in plain.requests]
    assert {g % 2 for i, g in enumerate(order) if i % 2 == 0} == {0, 1}
    assert order == [r.group for r in build_workload(shuffled, tokenizer).requests]
    # The same system prompts; each request starts with its group's.
    heads = {r.group: r.prompt[: len(r.prompt) // 2] for r in plain.requests}
    for r in mixed.requests:
        assert r.group is not None
        assert r.prompt_tokens == 40 + 32
        assert r.prompt.startswith(heads[r.group][:20])
    assert mixed.params["group_order"] == "random"


def test_multi_turn_extends_the_context(tokenizer: Tokenizer) -> None:
    spec = WorkloadSpec(
        kind=WorkloadKind.MULTI_TURN, num_requests=10, turns=4, input_len="20", output_len="7"
    )
    workload = build_workload(spec, tokenizer)
    assert [len(c) for c in workload.chains] == [4, 4, 2]
    for chain in workload.chains:
        assert len({r.session_id for r in chain}) == 1
        for prev, cur in itertools.pairwise(chain):
            assert cur.prompt.startswith(prev.prompt)
            assert cur.turn == prev.turn + 1
            assert cur.prompt_tokens == prev.prompt_tokens + prev.max_tokens + 20
            assert count(tokenizer, cur.prompt) == cur.prompt_tokens


def test_multi_turn_sessions_end_at_the_context_limit(tokenizer: Tokenizer) -> None:
    spec = WorkloadSpec(
        kind=WorkloadKind.MULTI_TURN, num_requests=6, turns=10, input_len="40",
        output_len="10", max_context=120,
    )  # fmt: skip
    workload = build_workload(spec, tokenizer)
    assert len(workload.requests) == 6
    assert all(len(chain) == 2 for chain in workload.chains)  # 50 + 50 fit, 150 does not
    assert all(r.prompt_tokens + r.max_tokens <= 120 for r in workload.requests)


def test_replay_jsonl(tokenizer: Tokenizer, tmp_path: Path) -> None:
    reply = " the lazy dog jumps over the quick brown fox"
    records = [
        {"conversations": [{"from": "human", "value": "The quick brown fox jumps"},
                           {"from": "gpt", "value": reply}]},
        {"messages": [{"role": "system", "content": "x"},
                      {"role": "user", "content": "Prefill computes the prompt's cache"},
                      {"role": "assistant", "content": "Decode generates"}]},
        {"prompt": "Distributed systems must tolerate partial failures", "output_len": 3},
        {"conversations": [{"from": "human", "value": "no answer"}]},
        {"prompt": "ab", "output_len": 3},  # too short a prompt (< 4 tokens)
    ]  # fmt: skip
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    spec = WorkloadSpec(kind=WorkloadKind.REPLAY, num_requests=7, replay_path=path, seed=3)
    workload = build_workload(spec, tokenizer)
    reqs = workload.requests
    assert len(reqs) == 7
    prompts = {r.prompt for r in reqs}
    assert len(prompts) == 3
    for r in reqs:
        assert count(tokenizer, r.prompt) == r.prompt_tokens
        if r.prompt.startswith("The quick"):
            assert r.max_tokens == count(tokenizer, reply)
        if r.prompt.startswith("Distributed"):
            assert r.max_tokens == 3
    assert build_workload(spec, tokenizer) == workload
    capped = build_workload(replace(spec, output_len="2"), tokenizer)
    assert max(r.max_tokens for r in capped.requests) == 2
    as_array = tmp_path / "chats.json"
    as_array.write_text(json.dumps(records), encoding="utf-8")
    assert len(build_workload(replace(spec, replay_path=as_array), tokenizer).requests) == 7
    with pytest.raises(ConfigError):
        build_workload(replace(spec, replay_path=None), tokenizer)
    with pytest.raises(ConfigError):
        build_workload(replace(spec, replay_path=tmp_path / "missing.jsonl"), tokenizer)


def test_length_dist_parsing() -> None:
    assert LengthDist.parse("10") == LengthDist(10, 10)
    assert LengthDist.parse("5-9") == LengthDist(5, 9)
    assert LengthDist.parse("normal:100,20").mean == 100
    rng = random.Random(0)
    assert all(LengthDist.parse("normal:3,50").sample(rng) >= 1 for _ in range(100))
    for bad in ("0", "9-5", "x", "normal:1", "normal:-1,2", "-3"):
        with pytest.raises(ConfigError):
            LengthDist.parse(bad)


class _CharTokenizer:
    """One token per character: nothing decodes to ' word', so exact prompts are impossible."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, token_ids: list[int]) -> str:
        return "".join(chr(t) for t in token_ids)

    def __len__(self) -> int:
        return 128


def test_unsupported_tokenizer_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="byte-level BPE"):
        PromptBuilder(_CharTokenizer())


def test_default_model_lengths_exact_when_present() -> None:
    path = resolve_model("default", prepare=False)
    if not (path / "tokenizer.json").is_file():
        pytest.skip("the default model is not prepared on this machine")
    tok = load_tokenizer(str(path))
    spec = WorkloadSpec(kind=WorkloadKind.SHARED_PREFIX, num_requests=6, prefix_len=300)
    for r in build_workload(spec, tok).requests:
        assert count(tok, r.prompt) == r.prompt_tokens == 332


def test_arrival_offsets() -> None:
    poisson = ArrivalSpec(kind=ArrivalKind.POISSON, rate=4.0, seed=9)
    offsets = start_offsets(poisson, 2000)
    assert offsets == start_offsets(poisson, 2000)
    assert offsets[0] == 0.0 and offsets == sorted(offsets)
    assert offsets[-1] / 1999 == pytest.approx(0.25, rel=0.1)  # mean gap 1/rate
    assert start_offsets(replace(poisson, rate=float("inf")), 3) == [0.0, 0.0, 0.0]
    burst = ArrivalSpec(kind=ArrivalKind.BURST, burst_size=3, burst_interval_s=2.0)
    assert start_offsets(burst, 7) == [0, 0, 0, 2, 2, 2, 4]
    assert burst.offered_rate == 1.5 and burst.label == "burst=3/2s"
    assert [s.rate for s in sweep(poisson, [1, 2])] == [1, 2]
    assert parse_rates("0.5, 1,2") == [0.5, 1.0, 2.0]
    assert parse_burst("8:5") == (8, 5.0)
    for bad in ("", "2,1", "0,1", "a"):
        with pytest.raises(ConfigError):
            parse_rates(bad)
    with pytest.raises(ConfigError):
        ArrivalSpec(concurrency=0)
