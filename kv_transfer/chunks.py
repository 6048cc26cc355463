"""KV slices <-> hashed chunks, the unit of the gRPC KV stream.

A slice is one layer's KV for a range of KV heads of one request: a contiguous tensor of
shape [num_blocks, head_count, block_size, entry_elems]. The producer cuts its bytes into
chunks of at most ``chunk_bytes``, each with an XXH3-64 hash; the consumer checks the
hash and writes the chunk straight into a preallocated tensor.

Copies: a ``KvChunk`` is encoded by hand as its protobuf header followed by the ``data``
field (valid protobuf: fields may come in any order), from a view of the staged tensor,
so the producer copies the payload once (into the message) instead of twice (tobytes,
then protobuf), and the consumer takes the payload as a view of the received message
instead of letting protobuf copy it. Standard protobuf parsers read these messages too.

Shared memory (kv_transfer/shm.py): a chunk may instead name its bytes in a /dev/shm file
of the producer; the assembler maps the file and reads them from there (no socket).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import xxhash

from pdserve.errors import KvIntegrityError, KvTransferError
from pdserve.kv_transfer.shm import ShmReader, tensor_nbytes
from pdserve.v1 import kv_transfer_pb2 as pb

DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024
# gRPC message limit for the KV channel: the largest chunk plus protobuf framing.
MAX_CHUNK_BYTES = 64 * 1024 * 1024
MESSAGE_LIMIT_BYTES = MAX_CHUNK_BYTES + 64 * 1024
_DATA_FIELD = pb.KvChunk.DESCRIPTOR.fields_by_name["data"].number
_DATA_TAG = bytes([_DATA_FIELD << 3 | 2])  # length-delimited


def content_hash(data: bytes | memoryview) -> int:
    return int(xxhash.xxh3_64_intdigest(data))


@dataclass
class WireChunk:
    """A ``KvChunk`` whose payload is kept apart (a view, not a protobuf copy)."""

    header: pb.KvChunk  # every field but ``data``
    payload: bytes | memoryview


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise KvTransferError("truncated KV chunk message")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def encode_chunk(chunk: WireChunk) -> bytes:
    """gRPC response serializer of KvTransfer.Fetch."""
    head = chunk.header.SerializeToString()
    return b"".join((head, _DATA_TAG, _varint(len(chunk.payload)), chunk.payload))


def decode_chunk(message: bytes) -> WireChunk:
    """gRPC response deserializer of KvTransfer.Fetch: the payload stays a view."""
    buf = memoryview(message)
    header_parts: list[memoryview] = []
    payload: memoryview = buf[0:0]
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = _read_varint(buf, pos)
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, pos = _read_varint(buf, pos)
        elif wire_type == 2:
            length, pos = _read_varint(buf, pos)
            if field == _DATA_FIELD:
                payload = buf[pos : pos + length]
                pos += length
                continue
            pos += length
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
        else:
            raise KvTransferError(f"unexpected wire type {wire_type} in a KV chunk")
        header_parts.append(buf[start:pos])
    if pos != len(buf):
        raise KvTransferError("truncated KV chunk message")
    return WireChunk(pb.KvChunk.FromString(b"".join(header_parts)), payload)


def _byte_view(tensor: torch.Tensor) -> np.ndarray:
    """A flat uint8 numpy view of a contiguous CPU tensor (any dtype, bfloat16 too)."""
    return tensor.contiguous().view(torch.uint8).reshape(-1).numpy()


def slice_chunks(
    layer: int,
    head_start: int,
    tensor: torch.Tensor,
    chunk_bytes: int,
    shm: tuple[str, int] | None = None,
) -> Iterator[WireChunk]:
    """Cut one slice into hashed chunks (views of ``tensor``: keep it alive and unchanged).

    ``shm``: (file name, byte offset of ``tensor`` in it) when ``tensor`` lives in a
    shared-memory file the consumer can map; the chunks then describe their bytes
    (shm_name/shm_offset/shm_bytes) and carry none.
    """
    if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
        raise KvTransferError(f"chunk size {chunk_bytes} outside 1..{MAX_CHUNK_BYTES} bytes")
    raw = _byte_view(tensor).data  # a memoryview over the tensor's bytes
    total = len(raw)
    for offset in range(0, total, chunk_bytes):
        data = raw[offset : offset + chunk_bytes]
        header = pb.KvChunk(
            layer=layer,
            head_start=head_start,
            head_count=tensor.shape[1],
            offset=offset,
            slice_bytes=total,
            xxh3_64=content_hash(data),
            entry_elems=tensor.shape[3],
        )
        if shm is None:
            yield WireChunk(header, data)
        else:
            header.shm_name, header.shm_offset, header.shm_bytes = (
                shm[0],
                shm[1] + offset,
                len(data),
            )
            yield WireChunk(header, b"")


class ReceiveArena:
    """Reusable receive memory of one consumer rank.

    A fresh multi-MiB tensor per load costs a page fault per 4 KiB on first write (on
    this project's VMs that made a 256 MiB fetch 5x slower than the copy itself), so a
    rank keeps one buffer, faulted in once, and carves each load's slices from it. Views
    it hands out are valid until the next ``reset``; loads of one rank are sequential.
    Loads over ``max_bytes`` get private memory instead of growing it further.
    """

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self.max_bytes = max_bytes
        self._buffer = torch.empty(0, dtype=torch.uint8)
        self._used = 0

    def reset(self, expected_bytes: int = 0) -> None:
        """Start a load; grow (and fault in) the buffer to ``expected_bytes`` first."""
        self._used = 0
        if len(self._buffer) < expected_bytes <= self.max_bytes:
            self._buffer = torch.zeros(expected_bytes, dtype=torch.uint8)

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = tensor_nbytes(shape, dtype)
        if self._used + nbytes > len(self._buffer):
            return torch.empty(shape, dtype=dtype)
        view = self._buffer[self._used : self._used + nbytes]
        self._used += nbytes
        return view.view(dtype).view(shape)


@dataclass
class _Slice:
    tensor: torch.Tensor
    raw: np.ndarray
    received: int = 0
    # (file, byte offset) when ``tensor`` is a view of a producer's shared-memory file:
    # chunks from that place are already where they belong.
    in_place: tuple[str, int] | None = None


class SliceAssembler:
    """Collects chunks into per-(layer, head range) tensors and verifies them.

    ``arena``: where the tensors go (default: fresh memory per slice)."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        arena: ReceiveArena | None = None,
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        self.arena = arena
        self._slices: dict[tuple[int, int, int], _Slice] = {}
        self._shm = ShmReader()
        self.bytes_received = 0
        self.shm_bytes_received = 0

    def add(self, chunk: WireChunk) -> None:
        head, data = chunk.header, chunk.payload
        if head.shm_name:
            data = self._shm.view(head.shm_name, head.shm_offset, head.shm_bytes)
        if content_hash(data) != head.xxh3_64:
            raise KvIntegrityError(
                f"KV chunk of layer {head.layer} at byte {head.offset} failed its XXH3 "
                "check (corrupted in transit)"
            )
        key = (head.layer, head.head_start, head.head_count)
        part = self._slices.get(key) or self._new_slice(key, head)
        end = head.offset + len(data)
        if end > part.raw.size:
            raise KvTransferError(f"KV chunk of layer {head.layer} overruns its slice")
        if part.in_place != (head.shm_name, head.shm_offset - head.offset):
            part.raw[head.offset : end] = np.frombuffer(data, dtype=np.uint8)
        part.received += len(data)
        self.bytes_received += len(data)
        if head.shm_name:
            self.shm_bytes_received += len(data)

    def _new_slice(self, key: tuple[int, int, int], head: pb.KvChunk) -> _Slice:
        shape = (self.num_blocks, head.head_count, self.block_size, head.entry_elems)
        nbytes = tensor_nbytes(shape, self.dtype)
        if nbytes != head.slice_bytes:
            raise KvTransferError(
                f"KV slice of layer {head.layer} has {head.slice_bytes} bytes, "
                f"expected {nbytes} for shape {shape} in {self.dtype}"
            )
        in_place = None
        if head.shm_name:  # the whole slice is one region of the producer's file
            in_place = (head.shm_name, head.shm_offset - head.offset)
            tensor = self._shm.tensor(*in_place, shape, self.dtype)
        elif self.arena is not None:
            tensor = self.arena.take(shape, self.dtype)
        else:
            tensor = torch.empty(shape, dtype=self.dtype)
        part = _Slice(tensor, _byte_view(tensor), in_place=in_place)
        self._slices[key] = part
        return part

    def complete_slices(self) -> dict[tuple[int, int, int], torch.Tensor]:
        """(layer, head_start, head_count) -> tensor, once every byte has arrived."""
        missing = [k for k, s in self._slices.items() if s.received != s.raw.size]
        if missing:
            raise KvTransferError(f"KV stream ended early: slices {missing} are incomplete")
        return {k: s.tensor for k, s in self._slices.items()}
