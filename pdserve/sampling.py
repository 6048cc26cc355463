"""Facts about the shared SamplingParams message, derived from the proto (one source)."""

from __future__ import annotations

from pdserve.v1 import common_pb2 as cpb

# Fields a client may leave unset so that vLLM's default applies (proto3 `optional`).
OPTIONAL_SAMPLING_FIELDS: tuple[str, ...] = tuple(
    f.name for f in cpb.SamplingParams.DESCRIPTOR.fields if f.has_presence
)
