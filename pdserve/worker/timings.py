"""Worker-side stage timings from vLLM's own per-request stats (not re-measured).

vLLM's ``RequestOutput.metrics`` (``RequestStateStats``) carries engine-core stamps from
``time.monotonic()``: ``queued_ts`` (the request entered the scheduler), ``scheduled_ts``
(first scheduled to compute), ``first_token_ts``, ``last_token_ts``. Linux's monotonic
clock is system-wide, so the worker converts them to wall time for spans.

What the intervals mean per stage:
* prefill: queue = queued..scheduled, prefill_compute = scheduled..first token.
* decode (KV from a prefill worker): vLLM starts the KV pull when it first considers the
  request and schedules it only once the KV has arrived, so kv_transfer =
  queued..scheduled (it includes any wait for a scheduling step, ~0 on an idle worker);
  first_token = scheduled..first token (the prompt's last token and the first sample);
  decode_compute = first..last token.
* full (colocated): queue, prefill_compute, decode_compute.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pdserve.tracing import (
    ATTR_KV_BLOCKS,
    ATTR_KV_BYTES,
    ATTR_KV_ENGINE,
    ATTR_KV_TRANSPORT,
    ATTR_TIMING_SOURCE,
    RequestTrace,
    monotonic_offset_ns,
    wall_ns_from_monotonic,
)
from pdserve.v1 import worker_pb2 as pb

# Trailing metadata key with the stage durations, for the router's timeline ring.
TIMINGS_METADATA_KEY = "pdserve-worker-timings"
TIMING_SOURCE = "vllm.RequestStateStats"

_INTERVALS: dict[int, tuple[tuple[str, str, str], ...]] = {
    pb.STAGE_PREFILL: (
        ("queue", "queued_ts", "scheduled_ts"),
        ("prefill_compute", "scheduled_ts", "first_token_ts"),
    ),
    pb.STAGE_DECODE: (
        ("kv_transfer", "queued_ts", "scheduled_ts"),
        ("first_token", "scheduled_ts", "first_token_ts"),
        ("decode_compute", "first_token_ts", "last_token_ts"),
    ),
    pb.STAGE_FULL: (
        ("queue", "queued_ts", "scheduled_ts"),
        ("prefill_compute", "scheduled_ts", "first_token_ts"),
        ("decode_compute", "first_token_ts", "last_token_ts"),
    ),
}


@dataclass(frozen=True)
class KvTransferInfo:
    """What a decode request obtained from its prefill worker (from the KV handle)."""

    transport: str
    producer_engine: str
    blocks: int
    bytes: int

    def attributes(self) -> dict[str, Any]:
        return {
            ATTR_KV_TRANSPORT: self.transport,
            ATTR_KV_ENGINE: self.producer_engine,
            ATTR_KV_BLOCKS: self.blocks,
            ATTR_KV_BYTES: self.bytes,
        }


def stage_intervals(stage: int, stats: Any) -> list[tuple[str, float, float]]:
    """(name, start, end) in monotonic seconds for the intervals vLLM recorded."""
    out = []
    for name, start_field, end_field in _INTERVALS.get(stage, ()):
        start = float(getattr(stats, start_field, 0.0) or 0.0)
        end = float(getattr(stats, end_field, 0.0) or 0.0)
        if start > 0 and end >= start:
            out.append((name, start, end))
    return out


def record_stage_spans(
    trace: RequestTrace, stage: int, stats: Any, kv: KvTransferInfo | None
) -> None:
    """Children of the worker's request span, one per vLLM-measured interval."""
    if not trace.enabled or stats is None:
        return
    offset = monotonic_offset_ns()
    for name, start, end in stage_intervals(stage, stats):
        attributes: dict[str, Any] = {ATTR_TIMING_SOURCE: TIMING_SOURCE}
        if name == "kv_transfer" and kv is not None:
            attributes.update(kv.attributes())
        trace.record(
            name,
            wall_ns_from_monotonic(start, offset),
            wall_ns_from_monotonic(end, offset),
            attributes,
        )


def timings_metadata(stage: int, stats: Any, kv: KvTransferInfo | None) -> tuple[str, str]:
    """Stage durations (ms) and KV figures as one trailing-metadata entry."""
    body: dict[str, Any] = {}
    if stats is not None:
        for name, start, end in stage_intervals(stage, stats):
            body[f"{name}_ms"] = round((end - start) * 1000, 3)
    if kv is not None:
        body["kv_bytes"] = kv.bytes
        body["kv_blocks"] = kv.blocks
    return TIMINGS_METADATA_KEY, json.dumps(body, separators=(",", ":"))


def parse_timings(metadata: Mapping[str, str]) -> dict[str, float]:
    """The router's side of ``timings_metadata``; bad values are dropped, never trusted."""
    raw = metadata.get(TIMINGS_METADATA_KEY)
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        return {}
    if not isinstance(body, dict):
        return {}
    return {
        str(k): float(v)
        for k, v in body.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
