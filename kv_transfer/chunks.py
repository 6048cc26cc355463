"""KV slices <-> checksummed chunks, the unit of the gRPC KV stream.

A slice is one layer's KV for a range of KV heads of one request: a contiguous tensor of
shape [num_blocks, head_count, block_size, entry_elems]. The producer cuts its bytes into
chunks of at most ``chunk_bytes`` with a CRC32C each; the consumer writes each chunk
straight into a preallocated tensor (through a numpy view, no intermediate buffers) after
checking its checksum, and knows when every slice is complete.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import google_crc32c
import numpy as np
import torch

from pdserve.errors import KvIntegrityError, KvTransferError
from pdserve.v1 import kv_transfer_pb2 as pb

DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024
# gRPC message limit for the KV channel: the largest chunk plus protobuf framing.
MAX_CHUNK_BYTES = 64 * 1024 * 1024
MESSAGE_LIMIT_BYTES = MAX_CHUNK_BYTES + 64 * 1024


def checksum(data: bytes) -> int:
    return int(google_crc32c.value(data))


def _byte_view(tensor: torch.Tensor) -> np.ndarray:
    """A flat uint8 numpy view of a contiguous CPU tensor (any dtype, bfloat16 too)."""
    return tensor.contiguous().view(torch.uint8).reshape(-1).numpy()


def slice_chunks(
    layer: int, head_start: int, tensor: torch.Tensor, chunk_bytes: int
) -> Iterator[pb.KvChunk]:
    """Cut one slice into checksummed chunks."""
    if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
        raise KvTransferError(f"chunk size {chunk_bytes} outside 1..{MAX_CHUNK_BYTES} bytes")
    raw = _byte_view(tensor)
    total = raw.size
    for offset in range(0, total, chunk_bytes):
        data = raw[offset : offset + chunk_bytes].tobytes()
        yield pb.KvChunk(
            layer=layer,
            head_start=head_start,
            head_count=tensor.shape[1],
            offset=offset,
            slice_bytes=total,
            data=data,
            crc32c=checksum(data),
            entry_elems=tensor.shape[3],
        )


@dataclass
class _Slice:
    tensor: torch.Tensor
    raw: np.ndarray
    received: int = 0


class SliceAssembler:
    """Collects chunks into per-(layer, head range) tensors and verifies them."""

    def __init__(self, num_blocks: int, block_size: int, dtype: torch.dtype) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        self._slices: dict[tuple[int, int, int], _Slice] = {}
        self.bytes_received = 0

    def add(self, chunk: pb.KvChunk) -> None:
        if checksum(chunk.data) != chunk.crc32c:
            raise KvIntegrityError(
                f"KV chunk of layer {chunk.layer} at byte {chunk.offset} failed its CRC32C "
                "check (corrupted in transit)"
            )
        key = (chunk.layer, chunk.head_start, chunk.head_count)
        part = self._slices.get(key)
        if part is None:
            shape = (self.num_blocks, chunk.head_count, self.block_size, chunk.entry_elems)
            tensor = torch.empty(shape, dtype=self.dtype)
            part = _Slice(tensor, _byte_view(tensor))
            if part.raw.size != chunk.slice_bytes:
                raise KvTransferError(
                    f"KV slice of layer {chunk.layer} has {chunk.slice_bytes} bytes, "
                    f"expected {part.raw.size} for shape {shape} in {self.dtype}"
                )
            self._slices[key] = part
        end = chunk.offset + len(chunk.data)
        if end > part.raw.size:
            raise KvTransferError(f"KV chunk of layer {chunk.layer} overruns its slice")
        part.raw[chunk.offset : end] = np.frombuffer(chunk.data, dtype=np.uint8)
        part.received += len(chunk.data)
        self.bytes_received += len(chunk.data)

    def complete_slices(self) -> dict[tuple[int, int, int], torch.Tensor]:
        """(layer, head_start, head_count) -> tensor, once every byte has arrived."""
        missing = [k for k, s in self._slices.items() if s.received != s.raw.size]
        if missing:
            raise KvTransferError(f"KV stream ended early: slices {missing} are incomplete")
        return {k: s.tensor for k, s in self._slices.items()}
