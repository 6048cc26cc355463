"""Protobuf sampling parameters -> vLLM ``SamplingParams``; vLLM finish reasons -> protobuf."""

from __future__ import annotations

from typing import Any

from pdserve.sampling import FINISH_REASON_BY_NAME, OPTIONAL_SAMPLING_FIELDS
from pdserve.v1 import common_pb2 as cpb


def to_vllm(
    msg: cpb.SamplingParams,
    *,
    max_tokens: int | None = None,
    kv_transfer_params: dict[str, Any] | None = None,
) -> Any:
    """Build vLLM sampling parameters that stream deltas (text and token ids)."""
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    kwargs: dict[str, Any] = {
        "max_tokens": max_tokens if max_tokens is not None else msg.max_tokens,
        "stop": list(msg.stop) or None,
        "stop_token_ids": list(msg.stop_token_ids) or None,
        "ignore_eos": msg.ignore_eos,
        "include_stop_str_in_output": msg.include_stop_str_in_output,
        "output_kind": RequestOutputKind.DELTA,
    }
    for name in OPTIONAL_SAMPLING_FIELDS:
        if msg.HasField(name):
            kwargs[name] = getattr(msg, name)
    if kv_transfer_params is not None:
        kwargs["extra_args"] = {"kv_transfer_params": kv_transfer_params}
    return SamplingParams(**kwargs)


def finish_reason_to_proto(reason: str | None) -> cpb.FinishReason:
    if reason is None:
        return cpb.FINISH_REASON_UNSPECIFIED
    return FINISH_REASON_BY_NAME.get(reason, cpb.FINISH_REASON_STOP)
