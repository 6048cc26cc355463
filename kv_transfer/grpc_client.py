"""The consumer side of the KvTransfer service: fetch slices, verify, confirm."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import torch

from pdserve.config import TlsConfig
from pdserve.errors import KvIncompatibleError, KvTransferError
from pdserve.kv_transfer.chunks import ReceiveArena, SliceAssembler, WireChunk, decode_chunk
from pdserve.kv_transfer.grpc_server import CHANNEL_OPTIONS, SERVICE_NAME
from pdserve.kv_transfer.shm import host_token
from pdserve.tls import handshake_problem, sync_channel
from pdserve.v1 import kv_transfer_pb2 as pb
from pdserve.v1 import kv_transfer_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class SliceRequest:
    """What one consumer rank wants from one producer rank."""

    request_id: str
    first_block: int
    num_blocks: int
    layers: tuple[int, ...]
    head_start: int
    head_count: int
    chunk_bytes: int


@dataclass(frozen=True)
class Fetched:
    """One fetch's slices, keyed (layer, head_start, head_count), and what it moved."""

    slices: dict[tuple[int, int, int], torch.Tensor]
    nbytes: int
    shm_nbytes: int  # the part read from the producer's /dev/shm (ADR 0015)


@dataclass(frozen=True)
class ConsumerLayout:
    dtype: torch.dtype
    block_size: int
    head_size: int

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def failure_reason(error: Exception) -> str:
    """A short, bounded label for the failures metric."""
    from pdserve.errors import KvIntegrityError

    if isinstance(error, KvIntegrityError):
        return "checksum"
    if isinstance(error, KvIncompatibleError):
        return "incompatible"
    rpc = error if isinstance(error, grpc.RpcError) else error.__cause__
    if isinstance(rpc, grpc.RpcError):
        code = rpc.code()  # e.g. not_found (lease expired), unavailable, deadline_exceeded
        return code.name.lower() if code is not None else "rpc"
    return "incomplete" if isinstance(error, KvTransferError) else "internal"


class _Channel:
    """A channel, its stub, and Fetch with the view-keeping chunk decoder."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.stub = pb_grpc.KvTransferStub(channel)
        self.fetch: Callable[..., Iterator[WireChunk]] = channel.unary_stream(
            f"/{SERVICE_NAME}/Fetch",
            request_serializer=pb.FetchRequest.SerializeToString,
            response_deserializer=decode_chunk,
        )


class KvFetcher:
    """Channels to producer ranks (one per address, reused) and the fetch logic."""

    def __init__(
        self,
        layout: ConsumerLayout,
        timeout_s: float,
        tls: TlsConfig | None = None,
        shared_memory: bool = True,
    ) -> None:
        """``shared_memory``: offer to read a same-host producer's /dev/shm staging
        (kv_transfer/shm.py) instead of receiving the bytes over the socket."""
        self.layout = layout
        self.timeout_s = timeout_s
        self.tls = tls
        self.shm_host = host_token() if shared_memory else ""
        self._channels: dict[str, _Channel] = {}
        self._lock = threading.Lock()

    def _channel(self, target: str) -> _Channel:
        with self._lock:
            channel = self._channels.get(target)
            if channel is None:
                channel = _Channel(sync_channel(target, self.tls, CHANNEL_OPTIONS))
                self._channels[target] = channel
            return channel

    def fetch(self, target: str, want: SliceRequest, arena: ReceiveArena | None = None) -> Fetched:
        """The slices, verified. ``arena``: where streamed slices go (views valid until
        its next reset).

        Raises KvIntegrityError on a checksum failure, KvIncompatibleError when the
        producer refuses the layout, KvTransferError for anything else.
        """
        msg = pb.FetchRequest(
            request_id=want.request_id,
            first_block=want.first_block,
            num_blocks=want.num_blocks,
            layers=list(want.layers),
            head_start=want.head_start,
            head_count=want.head_count,
            chunk_bytes=want.chunk_bytes,
            dtype=self.layout.dtype_name,
            block_size=self.layout.block_size,
            head_size=self.layout.head_size,
            shm_host=self.shm_host,
        )
        assembler = SliceAssembler(
            want.num_blocks, self.layout.block_size, self.layout.dtype, arena
        )
        try:
            for chunk in self._channel(target).fetch(msg, timeout=self.timeout_s):
                assembler.add(chunk)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.FAILED_PRECONDITION:
                raise KvIncompatibleError(e.details() or "KV layout mismatch") from e
            problem = handshake_problem(e, self.tls) or f"{e.code().name}: {e.details()}"
            raise KvTransferError(f"KV fetch from {target} failed: {problem}") from e
        return Fetched(
            assembler.complete_slices(), assembler.bytes_received, assembler.shm_bytes_received
        )

    def release(self, target: str, want: SliceRequest) -> bool:
        """Confirm delivery so the producer frees its copy. Best effort: the lease backs it."""
        try:
            reply = self._channel(target).stub.Release(
                pb.ReleaseRequest(
                    request_id=want.request_id,
                    layers=list(want.layers),
                    head_start=want.head_start,
                    head_count=want.head_count,
                ),
                timeout=self.timeout_s,
            )
        except grpc.RpcError:
            return False
        return bool(reply.freed)


def release_everything(
    host: str,
    port: int,
    ranks: int,
    request_id: str,
    timeout_s: float,
    tls: TlsConfig | None = None,
) -> int:
    """Free a request's staged KV on every producer rank (a consumer that will not read it).

    Returns how many ranks freed a copy. Best effort: the lease backs it.
    """
    freed = 0
    for rank in range(ranks):
        with sync_channel(f"{host}:{port + rank}", tls) as channel:
            try:
                reply = pb_grpc.KvTransferStub(channel).Release(
                    pb.ReleaseRequest(request_id=request_id), timeout=timeout_s
                )
            except grpc.RpcError:
                continue
            freed += int(reply.freed)
    return freed
