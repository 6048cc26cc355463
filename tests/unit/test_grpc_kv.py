"""The grpc KV transport without an engine: chunks, checksums, leases, the service itself."""

from __future__ import annotations

import socket

import grpc
import pytest
import torch

from pdserve.errors import KvIncompatibleError, KvIntegrityError, KvTransferError
from pdserve.kv_transfer.chunks import (
    ReceiveArena,
    SliceAssembler,
    WireChunk,
    decode_chunk,
    encode_chunk,
    slice_chunks,
)
from pdserve.kv_transfer.grpc_client import (
    ConsumerLayout,
    KvFetcher,
    SliceRequest,
    failure_reason,
    release_everything,
)
from pdserve.kv_transfer.grpc_metrics import families, merge
from pdserve.kv_transfer.grpc_server import KvTransferServer, RankLayout
from pdserve.kv_transfer.grpc_transport import GrpcTransport
from pdserve.kv_transfer.metadata import KvLayout
from pdserve.kv_transfer.registry import transport_for
from pdserve.kv_transfer.staging import Staging
from pdserve.kv_transfer.stats import TransferStats
from pdserve.v1 import kv_transfer_pb2 as pb
from pdserve.v1 import kv_transfer_pb2_grpc as pb_grpc

BLOCK = 16
HEAD = 8


def kv(blocks: int, heads: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(blocks, heads, BLOCK, 2 * HEAD, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_bytes", [1, 1000, 4096, 1 << 20])
def test_chunks_reassemble_bit_exact(dtype: torch.dtype, chunk_bytes: int) -> None:
    tensor = kv(3, 2, seed=1, dtype=dtype)
    nbytes = tensor.numel() * tensor.element_size()
    if chunk_bytes == 1:
        chunk_bytes = 7  # odd sizes split elements across chunks
    chunks = list(slice_chunks(5, 2, tensor, chunk_bytes))
    assert len(chunks) == -(-nbytes // chunk_bytes)
    assert all(len(c.payload) <= chunk_bytes for c in chunks)
    asm = SliceAssembler(3, BLOCK, dtype)
    for chunk in reversed(chunks):  # order does not matter; through the wire codec
        asm.add(decode_chunk(encode_chunk(chunk)))
    (key, got), *rest = asm.complete_slices().items()
    assert not rest and key == (5, 2, 2)
    assert torch.equal(got, tensor)
    assert asm.bytes_received == nbytes


def test_wire_encoding_is_plain_protobuf() -> None:
    chunk = next(slice_chunks(7, 1, kv(1, 1, seed=4), 300))
    wire = encode_chunk(chunk)
    parsed = pb.KvChunk.FromString(wire)  # any protobuf reader understands it
    assert parsed.data == bytes(chunk.payload) and parsed.layer == 7
    assert parsed.xxh3_64 == chunk.header.xxh3_64 and parsed.offset == 0
    # ... and our decoder reads messages written by a standard protobuf writer too.
    full = pb.KvChunk(layer=3, offset=9, data=b"abc", xxh3_64=5).SerializeToString()
    back = decode_chunk(full)
    assert bytes(back.payload) == b"abc" and back.header.layer == 3
    assert back.header.offset == 9 and not back.header.data
    with pytest.raises(KvTransferError, match="truncated"):
        decode_chunk(wire[:-1])


def test_corrupted_chunk_is_detected() -> None:
    chunks = list(slice_chunks(0, 0, kv(2, 1, seed=2), 256))
    flipped = bytearray(chunks[1].payload)
    flipped[0] ^= 1
    bad = WireChunk(chunks[1].header, bytes(flipped))
    asm = SliceAssembler(2, BLOCK, torch.float32)
    asm.add(chunks[0])
    with pytest.raises(KvIntegrityError, match="XXH3"):
        asm.add(bad)


def test_missing_chunk_is_incomplete() -> None:
    chunks = list(slice_chunks(0, 0, kv(2, 1, seed=3), 256))
    asm = SliceAssembler(2, BLOCK, torch.float32)
    for chunk in chunks[:-1]:
        asm.add(chunk)
    with pytest.raises(KvTransferError, match="incomplete"):
        asm.complete_slices()


def test_slice_of_wrong_size_is_refused() -> None:
    chunk = next(slice_chunks(0, 0, kv(2, 1, seed=3), 1 << 20))
    with pytest.raises(KvTransferError, match="expected"):
        SliceAssembler(3, BLOCK, torch.float32).add(chunk)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_lease_expiry_frees_and_reports() -> None:
    clock = FakeClock()
    expired: list[str] = []
    staging = Staging(30.0, clock=clock, on_expire=lambda e: expired.append(e.request_id))
    staging.put("a", {0: kv(2, 1, 0), 1: kv(2, 1, 1)}, head_start=0, head_count=1)
    staging.put("b", {0: kv(3, 1, 2)}, head_start=0, head_count=1)
    assert staging.totals()[:2] == (2, 5)
    clock.now += 29.9
    assert staging.expire() == [] and staging.get("a") is not None
    clock.now += 0.2
    assert staging.get("a") is None  # past its lease, even before the reaper ran
    assert sorted(e.request_id for e in staging.expire()) == ["a", "b"]
    assert sorted(expired) == ["a", "b"]
    assert staging.totals() == (0, 0, 0)


def test_confirmation_frees_only_when_every_cell_is_delivered() -> None:
    staging = Staging(30.0)
    # A TP2 consumer reads one head each from a producer rank holding heads 2..3.
    staging.put("r", {0: kv(1, 2, 0), 1: kv(1, 2, 1)}, head_start=2, head_count=2)
    assert staging.confirm("r", [0, 1], head_start=2, head_count=1) == (True, False)
    # A PP consumer stage confirms only its layer.
    assert staging.confirm("r", [0], head_start=3, head_count=1) == (True, False)
    assert staging.confirm("r", [1], head_start=3, head_count=1) == (True, True)
    assert staging.get("r") is None
    assert staging.confirm("r", [], 0, 0) == (False, False)


def test_stats_histogram_is_cumulative() -> None:
    stats = TransferStats()
    stats.received(100, 0.003)
    stats.received(50, 0.3)
    stats.failed("checksum")
    stats.expired()
    msg = stats.to_proto((1, 4, 4096))
    assert msg.bytes_received == 150 and msg.transfers == 2
    assert msg.staged_blocks == 4 and msg.lease_expirations == 1
    counts = list(msg.latency_bucket_counts)
    assert counts == sorted(counts) and counts[-1] == 2
    bounds = list(msg.latency_bucket_bounds)
    assert counts[bounds.index(0.005)] == 1 and counts[bounds.index(0.5)] == 2
    total = merge([msg, msg])
    assert total.bytes_received == 300 and total.failures["checksum"] == 2
    assert list(total.latency_bucket_counts) == [2 * c for c in counts]
    names = {f.name for f in families("decode", total)}
    assert "pdserve_kv_transfer_staged_blocks" in names
    assert "pdserve_kv_transfer_duration_seconds" in names


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def server() -> KvTransferServer:
    srv = KvTransferServer(
        "127.0.0.1", free_port(), 30.0, RankLayout("float32", BLOCK, HEAD), allow_faults=True
    )
    srv.start()
    yield srv
    srv.stop()


def test_fetch_head_window_and_release(server: KvTransferServer) -> None:
    layers = {3: kv(4, 2, 3), 4: kv(4, 2, 4)}
    server.staging.put("req", layers, head_start=0, head_count=2)
    fetcher = KvFetcher(ConsumerLayout(torch.float32, BLOCK, HEAD), timeout_s=10)
    addr = f"127.0.0.1:{server.port}"
    # A consumer TP rank owning head 1 and only layer 4, blocks 1..3.
    want = SliceRequest("req", 1, 3, (4,), head_start=1, head_count=1, chunk_bytes=500)
    got = fetcher.fetch(addr, want)
    slices, nbytes = got.slices, got.nbytes
    assert got.shm_nbytes == 0  # staged in private memory: streamed
    assert list(slices) == [(4, 1, 1)]
    assert torch.equal(slices[(4, 1, 1)], layers[4][1:4, 1:2])
    assert nbytes == 3 * BLOCK * 2 * HEAD * 4
    assert server.stats.bytes_sent == nbytes
    assert not fetcher.release(addr, want)  # other cells are still unconfirmed
    rest = SliceRequest("req", 0, 4, (3, 4), head_start=0, head_count=2, chunk_bytes=500)
    fetcher.fetch(addr, rest)
    assert fetcher.release(addr, rest)
    assert server.staging.totals() == (0, 0, 0)


def test_fetch_refuses_layout_mismatch_and_unknown_request(server: KvTransferServer) -> None:
    server.staging.put("req", {0: kv(1, 1, 0)}, head_start=0, head_count=1)
    addr = f"127.0.0.1:{server.port}"
    want = SliceRequest("req", 0, 1, (0,), 0, 1, 4096)
    for layout, match in (
        (ConsumerLayout(torch.float32, 32, HEAD), "block_size: producer=16 consumer=32"),
        (ConsumerLayout(torch.bfloat16, BLOCK, HEAD), "dtype: producer='float32'"),
    ):
        with pytest.raises(KvIncompatibleError, match=match):
            KvFetcher(layout, timeout_s=10).fetch(addr, want)
    fetcher = KvFetcher(ConsumerLayout(torch.float32, BLOCK, HEAD), timeout_s=10)
    with pytest.raises(KvTransferError, match="NOT_FOUND"):
        fetcher.fetch(addr, SliceRequest("other", 0, 1, (0,), 0, 1, 4096))


def test_injected_fault_is_caught_by_the_consumer(server: KvTransferServer) -> None:
    server.staging.put("req", {0: kv(2, 1, 0)}, head_start=0, head_count=1)
    addr = f"127.0.0.1:{server.port}"
    stub = pb_grpc.KvTransferStub(grpc.insecure_channel(addr))
    stub.InjectFault(pb.InjectFaultRequest(corrupt_next_chunks=1))
    fetcher = KvFetcher(ConsumerLayout(torch.float32, BLOCK, HEAD), timeout_s=10)
    want = SliceRequest("req", 0, 2, (0,), 0, 1, 1024)
    with pytest.raises(KvIntegrityError):
        fetcher.fetch(addr, want)
    slices = fetcher.fetch(addr, want).slices  # the next read is clean
    assert torch.equal(slices[(0, 0, 1)], server.staging.get("req").layers[0])  # type: ignore[union-attr]


def test_fault_injection_is_off_by_default() -> None:
    srv = KvTransferServer("127.0.0.1", free_port(), 30.0, RankLayout("float32", BLOCK, HEAD))
    srv.start()
    try:
        stub = pb_grpc.KvTransferStub(grpc.insecure_channel(f"127.0.0.1:{srv.port}"))
        with pytest.raises(grpc.RpcError) as info:
            stub.InjectFault(pb.InjectFaultRequest(corrupt_next_chunks=1))
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        srv.stop()


def test_transport_round_trip() -> None:
    transport = transport_for("grpc", 12.0, host="10.0.0.5", port=7000)
    assert isinstance(transport, GrpcTransport)
    config = transport.engine_kv_config(role=None, worker_id="p0")  # type: ignore[arg-type]
    assert config["kv_connector_module_path"] == "pdserve.kv_transfer.vllm_connector"
    assert config["kv_connector_extra_config"]["port"] == 7000
    layout = KvLayout("m", "float32", 16, 4, 2, 64, 2, 1)
    params = {
        "remote_host": "10.0.0.5",
        "remote_port": 7000,
        "remote_ranks": 2,
        "remote_request_id": "cmpl-1",
        "remote_num_blocks": 3,
    }
    handle = transport.handle_from_prefill(params, layout, 40, now_ms=1000)
    assert handle.block_ids == (0, 1, 2) and handle.lease_deadline_unix_ms == 13000
    decode = transport.decode_request_params(handle)
    assert decode == {
        "do_remote_prefill": True,
        "remote_host": "10.0.0.5",
        "remote_port": 7000,
        "remote_ranks": 2,
        "remote_request_id": "cmpl-1",
    }
    with pytest.raises(KvTransferError):
        transport.handle_from_prefill({"remote_host": "x"}, layout, 40, now_ms=0)


def test_failure_reasons_are_bounded_labels(server: KvTransferServer) -> None:
    fetcher = KvFetcher(ConsumerLayout(torch.float32, BLOCK, HEAD), timeout_s=10)
    with pytest.raises(KvTransferError) as info:
        fetcher.fetch(f"127.0.0.1:{server.port}", SliceRequest("gone", 0, 1, (0,), 0, 1, 4096))
    assert failure_reason(info.value) == "not_found"
    assert failure_reason(KvIntegrityError("x")) == "checksum"
    assert failure_reason(KvIncompatibleError("x")) == "incompatible"
    assert failure_reason(KvTransferError("x")) == "incomplete"


def test_release_everything_frees_unread_copies(server: KvTransferServer) -> None:
    server.staging.put("unread", {0: kv(1, 2, 0), 1: kv(1, 2, 1)}, head_start=0, head_count=2)
    assert release_everything("127.0.0.1", server.port, 1, "unread", timeout_s=5) == 1
    assert server.staging.totals() == (0, 0, 0)
    # A rank that does not answer (port + 1 here) is skipped, not an error.
    assert release_everything("127.0.0.1", server.port, 2, "unread", timeout_s=1) == 0


def test_the_receive_arena_reuses_its_memory_and_never_overlaps() -> None:
    arena = ReceiveArena(max_bytes=4096)
    arena.reset(1024)
    a = arena.take((4, 16), torch.float32)  # 256 bytes
    b = arena.take((8, 8), torch.float32)
    assert a.data_ptr() + 256 == b.data_ptr()  # carved in order, no overlap
    big = arena.take((1024,), torch.float32)  # over what is left: private memory
    assert not (arena._buffer.data_ptr() <= big.data_ptr() < arena._buffer.data_ptr() + 1024)
    arena.reset(512)  # smaller: the same buffer again
    assert arena.take((4, 16), torch.float32).data_ptr() == a.data_ptr()
    arena.reset(8192)  # over max_bytes: not grown
    assert len(arena._buffer) == 1024


def test_slices_assemble_into_the_arena() -> None:
    arena = ReceiveArena()
    arena.reset(2 * 3 * 2 * BLOCK * 2 * HEAD * 4)
    asm = SliceAssembler(3, BLOCK, torch.float32, arena)
    tensors = {layer: kv(3, 2, seed=layer) for layer in (0, 1)}
    for layer, tensor in tensors.items():
        for chunk in slice_chunks(layer, 0, tensor, 1000):
            asm.add(decode_chunk(encode_chunk(chunk)))
    got = asm.complete_slices()
    for layer, tensor in tensors.items():
        assert torch.equal(got[(layer, 0, 2)], tensor)
        start = got[(layer, 0, 2)].data_ptr() - arena._buffer.data_ptr()
        assert 0 <= start < len(arena._buffer)
