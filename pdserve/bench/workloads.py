"""Seeded, reproducible benchmark workloads whose prompt lengths are exact in tokens.

Prompts are built from "safe pieces" of the served model's own tokenizer: vocabulary
entries that decode to a space followed by letters and encode back to that one token.
Byte-level BPE pre-tokenizers split text before every space-letter run, so any
concatenation of safe pieces encodes to exactly one token per piece. That makes lengths
exact and additive, which shared prefixes and multi-turn contexts need.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from pdserve.errors import ConfigError

_SAFE_PIECE = re.compile(r" [A-Za-z]+")
_MAX_POOL = 4096  # plenty of variety; scanning a 50k vocabulary fully costs seconds
_MIN_POOL = 8


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer the workloads use."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, token_ids: list[int]) -> str: ...

    def __len__(self) -> int: ...


class WorkloadKind(StrEnum):
    RANDOM = "random"
    SHARED_PREFIX = "shared-prefix"
    LONG_INPUT_SHORT_OUTPUT = "long-input-short-output"
    SHORT_INPUT_LONG_OUTPUT = "short-input-long-output"
    MULTI_TURN = "multi-turn"
    REPLAY = "replay"


class GroupOrder(StrEnum):
    """Which system prompt each ``shared-prefix`` request uses, in sending order."""

    INTERLEAVED = "interleaved"  # request i: group i mod G
    RANDOM = "random"  # the same counts per group, in a seeded random order


# Default (input length, output length) per kind; the user's flags override them.
_DEFAULT_LENGTHS: dict[WorkloadKind, tuple[str, str]] = {
    WorkloadKind.RANDOM: ("100-300", "16-64"),
    WorkloadKind.SHARED_PREFIX: ("32", "32"),
    WorkloadKind.LONG_INPUT_SHORT_OUTPUT: ("1024", "16"),
    WorkloadKind.SHORT_INPUT_LONG_OUTPUT: ("32", "256"),
    WorkloadKind.MULTI_TURN: ("64", "32"),
    WorkloadKind.REPLAY: ("1536", "256"),  # caps, not targets, for replay
}


@dataclass(frozen=True)
class LengthDist:
    """A distribution of token counts: ``N``, ``A-B`` (uniform) or ``normal:MEAN,STD``."""

    low: int
    high: int
    mean: float | None = None
    std: float | None = None

    @classmethod
    def parse(cls, text: str) -> LengthDist:
        spec = text.strip().lower()
        try:
            if spec.startswith("normal:"):
                mean_s, std_s = spec.removeprefix("normal:").split(",")
                mean, std = float(mean_s), float(std_s)
                if mean < 1 or std < 0:
                    raise ValueError
                return cls(1, 1 << 30, mean, std)
            if "-" in spec:
                low_s, high_s = spec.split("-", 1)
                low, high = int(low_s), int(high_s)
            else:
                low = high = int(spec)
        except ValueError:
            raise ConfigError(
                f"bad length {text!r}: use N, A-B or normal:MEAN,STD (tokens, >= 1)"
            ) from None
        if low < 1 or high < low:
            raise ConfigError(f"bad length {text!r}: need 1 <= A <= B")
        return cls(low, high)

    def sample(self, rng: random.Random) -> int:
        if self.mean is not None:
            return max(1, round(rng.gauss(self.mean, self.std or 0.0)))
        return rng.randint(self.low, self.high)


@dataclass(frozen=True)
class BenchRequest:
    """One completion request; ``prompt_tokens`` is the tokenizer's exact count."""

    request_id: str
    prompt: str
    prompt_tokens: int
    max_tokens: int
    session_id: str | None = None
    turn: int = 0
    group: int | None = None


Chain = tuple[BenchRequest, ...]


@dataclass(frozen=True)
class Workload:
    """Chains of requests: each chain runs in order (a chat session), chains independently."""

    name: str
    chains: tuple[Chain, ...]
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def requests(self) -> list[BenchRequest]:
        return [r for chain in self.chains for r in chain]

    def summary(self) -> dict[str, Any]:
        reqs = self.requests
        ins = [r.prompt_tokens for r in reqs]
        outs = [r.max_tokens for r in reqs]
        return {
            "name": self.name,
            "params": self.params,
            "num_requests": len(reqs),
            "num_chains": len(self.chains),
            "input_tokens": {"min": min(ins), "max": max(ins), "mean": sum(ins) / len(ins)},
            "output_tokens": {"min": min(outs), "max": max(outs), "mean": sum(outs) / len(outs)},
        }


@dataclass(frozen=True)
class WorkloadSpec:
    """Everything that determines a workload; equal specs give identical workloads."""

    kind: WorkloadKind = WorkloadKind.RANDOM
    num_requests: int = 32
    input_len: str | None = None
    output_len: str | None = None
    seed: int = 0
    groups: int = 4
    prefix_len: int = 512
    group_order: GroupOrder = GroupOrder.INTERLEAVED
    turns: int = 4
    replay_path: Path | None = None
    max_context: int = 2048

    def lengths(self) -> tuple[LengthDist, LengthDist]:
        default_in, default_out = _DEFAULT_LENGTHS[self.kind]
        return (
            LengthDist.parse(self.input_len or default_in),
            LengthDist.parse(self.output_len or default_out),
        )

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["kind"] = self.kind.value
        out["group_order"] = self.group_order.value
        out["replay_path"] = str(self.replay_path) if self.replay_path else None
        return out


class PromptBuilder:
    """Makes text of an exact token count from the tokenizer's safe pieces."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.pieces = _safe_pieces(tokenizer)

    def text(self, num_tokens: int, rng: random.Random) -> str:
        return "".join(rng.choice(self.pieces) for _ in range(num_tokens))

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))


def _safe_pieces(tokenizer: Tokenizer) -> list[str]:
    pieces: list[str] = []
    seen: set[str] = set()
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        if text in seen or not _SAFE_PIECE.fullmatch(text):
            continue
        if tokenizer.encode(text, add_special_tokens=False) == [token_id]:
            pieces.append(text)
            seen.add(text)
            if len(pieces) >= _MAX_POOL:
                break
    if len(pieces) < _MIN_POOL:
        raise ConfigError(
            f"the tokenizer has only {len(pieces)} ' word' tokens that round-trip; exact-length"
            " prompts need a byte-level BPE tokenizer (GPT-2/Llama-3/SmolLM style)"
        )
    # Prove additivity on a long seeded sample rather than trusting the pre-tokenizer.
    rng = random.Random(1234)
    sample = [rng.choice(pieces) for _ in range(512)]
    got = len(tokenizer.encode("".join(sample), add_special_tokens=False))
    if got != len(sample):
        raise ConfigError(
            f"this tokenizer merges across words ({got} tokens for {len(sample)} pieces); "
            "exact-length prompts are not possible with it"
        )
    return pieces


def load_tokenizer(spec: str) -> Tokenizer:
    """Load a tokenizer from a model folder, or from the built-in ``tiny``/``default``."""
    from transformers import AutoTokenizer

    from pdserve.models import resolve_model

    tokenizer: Tokenizer = AutoTokenizer.from_pretrained(str(resolve_model(spec)))
    return tokenizer


def build_workload(spec: WorkloadSpec, tokenizer: Tokenizer) -> Workload:
    """Build the workload ``spec`` describes. Same spec and tokenizer, same workload."""
    if spec.num_requests < 1:
        raise ConfigError("a workload needs at least one request")
    rng = random.Random(spec.seed)
    if spec.kind is WorkloadKind.REPLAY:
        chains = _replay(spec, tokenizer, rng)
    else:
        builder = PromptBuilder(tokenizer)
        if spec.kind is WorkloadKind.SHARED_PREFIX:
            chains = _shared_prefix(spec, builder, rng)
        elif spec.kind is WorkloadKind.MULTI_TURN:
            chains = _multi_turn(spec, builder, rng)
        else:
            chains = _independent(spec, builder, rng)
    return Workload(spec.kind.value, tuple(chains), spec.to_json())


def _fit(spec: WorkloadSpec, prompt_len: int, out_len: int) -> tuple[int, int]:
    """Clip lengths so prompt + output fits the model context (prompt wins, output >= 1)."""
    prompt_len = min(prompt_len, spec.max_context - 1)
    return prompt_len, max(1, min(out_len, spec.max_context - prompt_len))


def _independent(spec: WorkloadSpec, builder: PromptBuilder, rng: random.Random) -> list[Chain]:
    in_dist, out_dist = spec.lengths()
    chains: list[Chain] = []
    for i in range(spec.num_requests):
        n_in, n_out = _fit(spec, in_dist.sample(rng), out_dist.sample(rng))
        prompt = builder.text(n_in, rng)
        chains.append((BenchRequest(f"{spec.kind.value}-{i}", prompt, n_in, n_out),))
    return chains


def _shared_prefix(spec: WorkloadSpec, builder: PromptBuilder, rng: random.Random) -> list[Chain]:
    """G long system prompts; each request is one of them plus a user question."""
    if spec.groups < 1 or not 1 <= spec.prefix_len <= spec.max_context - 2:
        raise ConfigError(
            "shared-prefix needs --groups >= 1 and 1 <= --prefix-len <= --max-context - 2"
        )
    in_dist, out_dist = spec.lengths()
    prefixes = [builder.text(spec.prefix_len, rng) for _ in range(spec.groups)]
    # Interleaved, so a router cannot win by arrival order alone. With G a multiple of
    # the worker count, round robin then keeps each group on one worker by accident;
    # a random order (its own generator: the prompts stay the same) avoids that.
    order = [i % spec.groups for i in range(spec.num_requests)]
    if spec.group_order is GroupOrder.RANDOM:
        random.Random(spec.seed + 1).shuffle(order)
    chains: list[Chain] = []
    for i, group in enumerate(order):
        n_q, n_out = _fit(spec, in_dist.sample(rng), out_dist.sample(rng))
        n_q = max(1, min(n_q, spec.max_context - 1 - spec.prefix_len))
        n_out = max(1, min(n_out, spec.max_context - spec.prefix_len - n_q))
        prompt = prefixes[group] + builder.text(n_q, rng)
        request = BenchRequest(
            f"shared-prefix-{i}", prompt, spec.prefix_len + n_q, n_out, group=group
        )
        chains.append((request,))
    return chains


def _multi_turn(spec: WorkloadSpec, builder: PromptBuilder, rng: random.Random) -> list[Chain]:
    """Sessions whose every turn is the previous prompt + its answer + a new user message.

    The answer in the context is synthetic (``max_tokens`` safe pieces), not the server's
    text, so the workload is the same against every target and lengths stay exact.
    """
    if spec.turns < 1:
        raise ConfigError("multi-turn needs --turns >= 1")
    in_dist, out_dist = spec.lengths()
    chains: list[Chain] = []
    made = 0
    while made < spec.num_requests:
        s = len(chains)
        context, context_len, turns = "", 0, []
        for t in range(min(spec.turns, spec.num_requests - made)):
            n_user, n_out = in_dist.sample(rng), out_dist.sample(rng)
            if context_len + n_user + n_out > spec.max_context:
                break  # the session has filled the context; it ends early
            context += builder.text(n_user, rng)
            context_len += n_user
            turns.append(
                BenchRequest(
                    f"session-{s}-turn-{t}", context, context_len, n_out, f"session-{s}", t
                )
            )
            made += 1
            context += builder.text(n_out, rng)
            context_len += n_out
        if not turns:
            raise ConfigError("multi-turn: one user message plus answer exceeds --max-context")
        chains.append(tuple(turns))
    return chains


def _replay(spec: WorkloadSpec, tokenizer: Tokenizer, rng: random.Random) -> list[Chain]:
    """First user turn and the reply's length of sampled JSONL/JSON conversations."""
    if spec.replay_path is None:
        raise ConfigError("the replay workload needs --replay FILE")
    in_cap, out_cap = (d.high for d in spec.lengths())
    pairs = []
    for record in _read_records(spec.replay_path):
        pair = _prompt_and_reply(record)
        if pair is None:
            continue
        n_in = len(tokenizer.encode(pair[0], add_special_tokens=False))
        if isinstance(pair[1], int):
            n_out = pair[1]
        else:
            n_out = len(tokenizer.encode(pair[1], add_special_tokens=False))
        n_out = max(1, min(n_out, out_cap))
        if 4 <= n_in <= in_cap and n_in + n_out <= spec.max_context:
            pairs.append((pair[0], n_in, n_out))
    if not pairs:
        raise ConfigError(f"{spec.replay_path}: no usable conversation (prompt 4..{in_cap} tokens)")
    rng.shuffle(pairs)
    chains: list[Chain] = []
    for i in range(spec.num_requests):
        prompt, n_in, n_out = pairs[i % len(pairs)]  # cycles when the file is short
        chains.append((BenchRequest(f"replay-{i}", prompt, n_in, n_out),))
    return chains


def _read_records(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e}") from e
    try:
        if text.lstrip().startswith("["):
            data = json.loads(text)  # the original ShareGPT dump is one JSON array
        else:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not JSON lines or a JSON array: {e}") from e
    return [r for r in data if isinstance(r, dict)]


def _prompt_and_reply(record: dict[str, Any]) -> tuple[str, str | int] | None:
    """ShareGPT ``conversations``, OpenAI ``messages`` or ``{"prompt", "output_len"}``."""
    if isinstance(record.get("prompt"), str):
        out = record.get("output_len", record.get("max_tokens", 128))
        return (record["prompt"], int(out)) if isinstance(out, int) else None
    turns = record.get("conversations") or record.get("messages")
    if not isinstance(turns, list):
        return None
    texts: list[tuple[str, str]] = []
    for turn in turns:
        if not isinstance(turn, dict):
            return None
        role = str(turn.get("from", turn.get("role", "")))
        content = turn.get("value", turn.get("content"))
        if isinstance(content, str):
            texts.append(("user" if role in ("human", "user") else role, content))
    for (role, content), (next_role, reply) in itertools.pairwise(texts):
        if role == "user" and next_role in ("gpt", "assistant", "chatgpt", "bard"):
            return content, reply
    return None
