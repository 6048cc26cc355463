"""Sampling parameters checked in the router, for both client APIs, before any worker is
touched: a value vLLM would refuse must be a clear 400 / INVALID_ARGUMENT here, not a
worker error (which the router would also retry on another worker)."""

from __future__ import annotations

import math

from pdserve.errors import InvalidRequestError
from pdserve.router.api.openai_schema import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS
from pdserve.v1 import common_pb2 as cpb

MAX_STOP_TOKEN_IDS = 256

# (field, low, high, low inclusive): the ranges vLLM's SamplingParams accepts.
_RANGES: tuple[tuple[str, float, float, bool], ...] = (
    ("temperature", 0.0, 2.0, True),
    ("top_p", 0.0, 1.0, False),
    ("presence_penalty", -2.0, 2.0, True),
    ("frequency_penalty", -2.0, 2.0, True),
    ("repetition_penalty", 0.0, math.inf, False),
)


def check_sampling(sampling: cpb.SamplingParams) -> None:
    """Raise InvalidRequestError for a value no engine would accept (``max_tokens`` is
    resolved against the context before this)."""
    for name, low, high, inclusive in _RANGES:
        if not sampling.HasField(name):
            continue
        value = getattr(sampling, name)
        above = value >= low if inclusive else value > low
        if not (math.isfinite(value) and above and value <= high):
            bracket = "[" if inclusive else "("
            raise InvalidRequestError(
                f"{name}={value} is outside {bracket}{low:g}, {high:g}]", param=name
            )
    if sampling.HasField("top_k") and sampling.top_k < -1:
        raise InvalidRequestError("top_k must be -1 or 0 (off) or at least 1", param="top_k")
    if sampling.HasField("min_tokens") and sampling.min_tokens > sampling.max_tokens:
        raise InvalidRequestError(
            f"min_tokens={sampling.min_tokens} exceeds max_tokens={sampling.max_tokens}",
            param="min_tokens",
        )
    stops = list(sampling.stop)
    if len(stops) > MAX_STOP_STRINGS:
        raise InvalidRequestError(f"at most {MAX_STOP_STRINGS} stop strings", param="stop")
    if any(not s or len(s) > MAX_STOP_STRING_CHARS for s in stops):
        raise InvalidRequestError(
            f"stop strings must be 1 to {MAX_STOP_STRING_CHARS} characters", param="stop"
        )
    if len(sampling.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidRequestError(
            f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids", param="stop_token_ids"
        )
