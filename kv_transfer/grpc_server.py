"""The KvTransfer gRPC service of one engine rank: serves staged KV, counts, expires.

Runs inside the vLLM engine process (like NIXL's side channel), on a small thread pool,
so the engine's own loop is never blocked by a slow reader.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc

from pdserve.config import TlsConfig
from pdserve.kv_transfer.chunks import MESSAGE_LIMIT_BYTES, WireChunk, encode_chunk, slice_chunks
from pdserve.kv_transfer.shm import host_token, sweep_stale
from pdserve.kv_transfer.staging import StagedKv, Staging
from pdserve.kv_transfer.stats import TransferStats
from pdserve.tls import add_port
from pdserve.v1 import kv_transfer_pb2 as pb
from pdserve.v1 import kv_transfer_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

# Deliberate limits: one chunk plus framing; anything larger is a bug or an attack.
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MESSAGE_LIMIT_BYTES),
    ("grpc.max_receive_message_length", MESSAGE_LIMIT_BYTES),
]
REAP_INTERVAL_S = 0.25
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["KvTransfer"].full_name
# Set to 1 in a worker's environment to allow the InjectFault test hook.
FAULT_INJECTION_ENV = "PDSERVE_KV_FAULT_INJECTION"


@dataclass(frozen=True)
class RankLayout:
    """What this rank's staged KV looks like, checked against each fetch."""

    dtype: str
    block_size: int
    head_size: int


def _head_window(entry: StagedKv, start: int, count: int) -> tuple[int, int]:
    """Intersection of the wanted global heads with the entry's, as (start, count)."""
    if count == 0:
        return entry.head_start, entry.head_count
    lo = max(start, entry.head_start)
    hi = min(start + count, entry.head_start + entry.head_count)
    return lo, max(0, hi - lo)


class KvTransferService(pb_grpc.KvTransferServicer):
    def __init__(
        self, staging: Staging, stats: TransferStats, layout: RankLayout, allow_faults: bool
    ) -> None:
        self.staging = staging
        self.stats = stats
        self.layout = layout
        self.allow_faults = allow_faults
        self._corrupt_next = 0
        self._lock = threading.Lock()

    def _check_layout(self, request: pb.FetchRequest) -> str | None:
        mine = self.layout
        problems = [
            f"{name}: producer={have!r} consumer={want!r}"
            for name, have, want in (
                ("dtype", mine.dtype, request.dtype),
                ("block_size", mine.block_size, request.block_size),
                ("head_size", mine.head_size, request.head_size),
            )
            if have != want
        ]
        return "; ".join(problems) or None

    def _take_fault(self) -> bool:
        with self._lock:
            if self._corrupt_next > 0:
                self._corrupt_next -= 1
                return True
            return False

    def Fetch(self, request: pb.FetchRequest, context: grpc.ServicerContext) -> Iterator[WireChunk]:
        problem = self._check_layout(request)
        if problem:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "prefill and decode workers disagree on the KV layout: " + problem,
            )
        entry = self.staging.get(request.request_id)
        if entry is None:
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"no KV staged for request {request.request_id} (lease expired or released)",
            )
        assert entry is not None  # context.abort raises
        last = request.first_block + request.num_blocks
        if last > entry.num_blocks:
            context.abort(
                grpc.StatusCode.OUT_OF_RANGE,
                f"blocks {request.first_block}..{last} requested, {entry.num_blocks} staged",
            )
        head_lo, head_n = _head_window(entry, request.head_start, request.head_count)
        if head_n == 0:
            return
        layers = sorted(set(request.layers) & set(entry.layers)) or (
            [] if request.layers else sorted(entry.layers)
        )
        offset = head_lo - entry.head_start
        # Same host and staged in /dev/shm: describe the bytes instead of sending them.
        buffer = entry.buffer if request.shm_host and request.shm_host == host_token() else None
        for layer in layers:
            part = entry.layers[layer][request.first_block : last, offset : offset + head_n]
            # A head window of a wider staged copy is not contiguous: it is streamed.
            where = buffer.offset_of(part) if buffer is not None else None
            shm = (buffer.name, where) if buffer is not None and where is not None else None
            for chunk in slice_chunks(layer, head_lo, part.contiguous(), request.chunk_bytes, shm):
                self.stats.sent(chunk.header.shm_bytes or len(chunk.payload))
                if self._take_fault():
                    _corrupt(chunk)
                yield chunk

    def Release(
        self, request: pb.ReleaseRequest, context: grpc.ServicerContext
    ) -> pb.ReleaseResponse:
        found, freed = self.staging.confirm(
            request.request_id, request.layers, request.head_start, request.head_count
        )
        return pb.ReleaseResponse(found=found, freed=freed)

    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.KvTransferStats:
        return self.stats.to_proto(self.staging.totals())

    def InjectFault(
        self, request: pb.InjectFaultRequest, context: grpc.ServicerContext
    ) -> pb.InjectFaultResponse:
        if not self.allow_faults:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "fault injection is disabled")
        with self._lock:
            self._corrupt_next = request.corrupt_next_chunks
        return pb.InjectFaultResponse()


def _corrupt(chunk: WireChunk) -> None:
    """The InjectFault hook: damage what the consumer receives, never the staged copy."""
    if chunk.header.shm_name:
        chunk.header.xxh3_64 ^= 1  # the bytes are shared: the hash is what travels
    else:
        data = bytearray(chunk.payload)
        data[0] ^= 0xFF
        chunk.payload = bytes(data)


def _add_service(service: KvTransferService, server: grpc.Server) -> None:
    """The generated registration, except that Fetch sends hand-encoded chunks."""
    handlers = {
        "Fetch": grpc.unary_stream_rpc_method_handler(
            service.Fetch,
            request_deserializer=pb.FetchRequest.FromString,
            response_serializer=encode_chunk,
        ),
        "Release": grpc.unary_unary_rpc_method_handler(
            service.Release,
            request_deserializer=pb.ReleaseRequest.FromString,
            response_serializer=pb.ReleaseResponse.SerializeToString,
        ),
        "Stats": grpc.unary_unary_rpc_method_handler(
            service.Stats,
            request_deserializer=pb.StatsRequest.FromString,
            response_serializer=pb.KvTransferStats.SerializeToString,
        ),
        "InjectFault": grpc.unary_unary_rpc_method_handler(
            service.InjectFault,
            request_deserializer=pb.InjectFaultRequest.FromString,
            response_serializer=pb.InjectFaultResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


class KvTransferServer:
    """The service on ``host:port`` plus the thread that expires leases."""

    def __init__(
        self,
        host: str,
        port: int,
        lease_s: float,
        layout: RankLayout,
        allow_faults: bool = False,
        tls: TlsConfig | None = None,
    ) -> None:
        self.port = port
        self.stats = TransferStats()
        self.staging = Staging(lease_s, on_expire=self._expired)
        self.service = KvTransferService(self.staging, self.stats, layout, allow_faults)
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="kv-transfer"),
            # No SO_REUSEPORT: a second process on this port must fail to bind, not get
            # a share of the connections (seen: a plaintext server beside an mTLS one).
            options=[*CHANNEL_OPTIONS, ("grpc.so_reuseport", 0)],
        )
        _add_service(self.service, self._server)
        if add_port(self._server, f"{host}:{port}", tls) == 0:
            raise OSError(f"KV transfer server cannot bind {host}:{port}")
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name="kv-lease-reaper", daemon=True)

    def _expired(self, entry: StagedKv) -> None:
        self.stats.expired()
        log.warning("KV lease of request %s expired before decode confirmed", entry.request_id)

    def _reap(self) -> None:
        while not self._stop.wait(REAP_INTERVAL_S):
            self.staging.expire()

    def start(self) -> None:
        sweep_stale()  # shared-memory KV of engines that died before freeing it
        self._server.start()
        self._reaper.start()

    def stop(self) -> None:
        self._stop.set()
        self._server.stop(grace=None)
        self.staging.clear()
