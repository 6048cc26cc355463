"""Facts about the shared SamplingParams message, derived from the proto (one source)."""

from __future__ import annotations

from pdserve.v1 import common_pb2 as cpb

# Fields a client may leave unset so that vLLM's default applies (proto3 `optional`).
OPTIONAL_SAMPLING_FIELDS: tuple[str, ...] = tuple(
    f.name for f in cpb.SamplingParams.DESCRIPTOR.fields if f.has_presence
)

# OpenAI finish_reason names <-> the protobuf enum, both directions from one table.
FINISH_REASON_BY_NAME: dict[str, cpb.FinishReason] = {
    "stop": cpb.FINISH_REASON_STOP,
    "length": cpb.FINISH_REASON_LENGTH,
    "abort": cpb.FINISH_REASON_ABORT,
}
FINISH_REASON_NAMES: dict[int, str] = {v: k for k, v in FINISH_REASON_BY_NAME.items()}
