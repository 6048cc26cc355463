"""Service times of prefill, decode and KV transfer, and their fit from `pdserve bench`.

The model is deliberately small (a few linear terms), so that two or three cheap
measurements pin it down:

* a prefill batch of T prompt tokens takes ``prefill_base_s + prefill_per_token_s * T``;
* a decode step over B running sequences takes ``decode_base_s + decode_per_seq_s * B``
  and gives each of them one token;
* a KV transfer of N prompt tokens takes ``link_latency_s + N * kv_bytes_per_token /
  link_bytes_per_s``, one transfer at a time per decode worker's link;
* ``overhead_s`` is the fixed rest of a request's path to its first token (router,
  tokenization, gRPC hops, the KV handshake) that none of the above covers;
* ``decode_step_sigma`` spreads each decode step's duration log-normally around its mean
  (steps on a real host are not all equal: measured ITL p90 about 1.2x p50 at
  concurrency 1); 0 gives exact, deterministic steps.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pdserve.errors import ConfigError


@dataclass(frozen=True)
class ServiceModel:
    prefill_base_s: float
    prefill_per_token_s: float
    decode_base_s: float
    decode_per_seq_s: float
    kv_bytes_per_token: float
    link_bytes_per_s: float
    link_latency_s: float = 0.0
    overhead_s: float = 0.0
    # A prefill batch takes queued prompts up to this many tokens (at least one prompt).
    max_prefill_batch_tokens: int = 4096
    # KV cache of a decode worker, in tokens (prompt + output of running sequences).
    decode_kv_capacity_tokens: int = 200_000
    # Colocated workers: prompt tokens a mixed step takes (vLLM's chunked prefill budget).
    chunk_tokens: int = 512
    decode_step_sigma: float = 0.0

    def prefill_s(self, tokens: int) -> float:
        return self.prefill_base_s + self.prefill_per_token_s * tokens

    def decode_step_s(self, running: int) -> float:
        return self.decode_base_s + self.decode_per_seq_s * running

    def step_factor(self, rng: random.Random) -> float:
        """A decode step's duration over its mean: log-normal with mean 1."""
        if self.decode_step_sigma <= 0:
            return 1.0
        sigma = self.decode_step_sigma
        return math.exp(rng.gauss(-sigma * sigma / 2, sigma))

    def transfer_s(self, tokens: int) -> float:
        return self.link_latency_s + tokens * self.kv_bytes_per_token / self.link_bytes_per_s

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BenchPoint:
    """The means of one `pdserve bench` phase (results.json)."""

    concurrency: float
    input_tokens: float  # mean per request
    output_tokens: float
    ttft_mean_s: float
    itl_mean_s: float
    itl_p50_s: float = 0.0
    itl_p90_s: float = 0.0


def read_bench(path: Path) -> BenchPoint:
    """The first target's first phase of a `pdserve bench` results.json."""
    doc = json.loads(Path(path).read_text())
    phase = doc["targets"][0]["phases"][0]
    m = phase["metrics"]
    arrival = phase.get("arrival", {})
    concurrency = arrival.get("concurrency") or arrival.get("max_concurrency") or 0
    n = max(m["completed"], 1)
    return BenchPoint(
        concurrency=float(concurrency),
        input_tokens=m["input_tokens"] / n,
        output_tokens=m["output_tokens"] / n,
        ttft_mean_s=m["ttft_s"]["mean"],
        itl_mean_s=m["itl_s"]["mean"],
        itl_p50_s=m["itl_s"]["p50"],
        itl_p90_s=m["itl_s"]["p90"],
    )


def fit(
    short: BenchPoint,
    long: BenchPoint,
    batched: BenchPoint,
    kv_bytes_per_token: float,
    link_bytes_per_s: float,
) -> ServiceModel:
    """Fit the model from three closed-loop runs: one request at a time with short and
    with long prompts (prefill cost per token, fixed overhead) and several at a time with
    short prompts (decode cost per running sequence).

    Decode: at concurrency 1 a step has one sequence; under concurrency C the mean batch
    is about C (closed loop, the decode phase dominates each request's time). The step's
    spread comes from the concurrency-1 run's ITL p90/p50 (log-normal: p90/p50 =
    exp(1.2816 sigma)).
    """
    if not short.concurrency == long.concurrency == 1:
        raise ConfigError("the short and long runs must have concurrency 1")
    if long.input_tokens <= short.input_tokens or batched.concurrency <= 1:
        raise ConfigError("need a longer prompt in `long` and concurrency > 1 in `batched`")
    per_seq = max(0.0, (batched.itl_mean_s - short.itl_mean_s) / (batched.concurrency - 1))
    base = short.itl_mean_s - per_seq
    transfer = (long.input_tokens - short.input_tokens) * kv_bytes_per_token / link_bytes_per_s
    per_token = max(
        0.0,
        (long.ttft_mean_s - short.ttft_mean_s - transfer)
        / (long.input_tokens - short.input_tokens),
    )
    # TTFT at concurrency 1 = overhead + prefill + transfer + the first decode step.
    rest = (
        short.ttft_mean_s
        - per_token * short.input_tokens
        - short.input_tokens * kv_bytes_per_token / link_bytes_per_s
        - (base + per_seq)
    )
    return ServiceModel(
        prefill_base_s=0.0,
        prefill_per_token_s=per_token,
        decode_base_s=base,
        decode_per_seq_s=per_seq,
        kv_bytes_per_token=kv_bytes_per_token,
        link_bytes_per_s=link_bytes_per_s,
        overhead_s=max(0.0, rest),
        decode_step_sigma=_step_sigma(short),
    )


_Z90 = 1.2816  # the standard normal's 90th percentile


def _step_sigma(point: BenchPoint) -> float:
    if point.itl_p50_s <= 0 or point.itl_p90_s <= point.itl_p50_s:
        return 0.0
    return math.log(point.itl_p90_s / point.itl_p50_s) / _Z90
