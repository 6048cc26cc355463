"""vLLM KV cache event batches on the wire (msgspec msgpack), decoded without importing vLLM.

A publisher sends three ZMQ frames per batch: topic, an 8-byte big-endian sequence number
and ``[ts, [events...], data_parallel_rank]``; each event is a map tagged with its class
name. Fields this router does not use are ignored, so newer vLLM versions still decode.
"""

from __future__ import annotations

import msgspec


class BlockStored(msgspec.Struct, tag=True):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None = None
    token_ids: list[int] = []
    block_size: int = 0
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[object] | None = None
    group_idx: int | None = None


class BlockRemoved(msgspec.Struct, tag=True):
    block_hashes: list[int | bytes]
    medium: str | None = None
    group_idx: int | None = None


class AllBlocksCleared(msgspec.Struct, tag=True):
    pass


KvEvent = BlockStored | BlockRemoved | AllBlocksCleared


class EventBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[KvEvent]
    data_parallel_rank: int | None = None


_decoder = msgspec.msgpack.Decoder(EventBatch)
_encoder = msgspec.msgpack.Encoder()
# The replay stream's end marker (vLLM's ZmqEventPublisher.END_SEQ).
END_SEQ = -1


def decode_batch(payload: bytes) -> EventBatch:
    return _decoder.decode(payload)


def encode_batch(batch: EventBatch) -> bytes:
    """Encode as vLLM does (tests and synthetic streams)."""
    return _encoder.encode(batch)


def as_int_hash(value: int | bytes) -> int:
    """Engines run with integer hashes; bytes (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0) are
    folded to the same 64-bit value."""
    if isinstance(value, bytes):
        return int.from_bytes(value, "big") & ((1 << 64) - 1)
    return value
