"""The grpc transport's same-host shared-memory path (kv_transfer/shm.py, ADR 0015)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch

from pdserve.errors import KvIntegrityError, KvTransferError
from pdserve.kv_transfer import chunks, shm
from pdserve.kv_transfer.chunks import ReceiveArena
from pdserve.kv_transfer.grpc_client import ConsumerLayout, KvFetcher, SliceRequest
from pdserve.kv_transfer.grpc_server import KvTransferServer
from pdserve.kv_transfer.staging import Staging
from tests.unit.test_grpc_kv import BLOCK, HEAD, kv, server

__all__ = ["server"]  # the fixture, shared with test_grpc_kv

pytestmark = pytest.mark.skipif(not shm.host_token(), reason="no /dev/shm on this machine")


class CountingReader(shm.ShmReader):
    reads = 0

    def view(self, name: str, offset: int, nbytes: int) -> memoryview:
        CountingReader.reads += 1
        return super().view(name, offset, nbytes)


@pytest.fixture
def shm_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[CountingReader]]:
    CountingReader.reads = 0
    monkeypatch.setattr(chunks, "ShmReader", CountingReader)
    yield CountingReader


def stage(server: KvTransferServer, request_id: str, heads: int = 2) -> dict[int, torch.Tensor]:
    """Stage blocks 1 and 3 of two layers as the connector does; returns what was staged."""
    paged = {layer: kv(4, heads, seed=layer) for layer in (0, 1)}
    index = torch.tensor([1, 3])
    layers, buffer = shm.BlockStager(shared=True).stage(paged, index)
    assert buffer is not None and (shm.SHM_DIR / buffer.name).exists()
    server.staging.put(request_id, layers, 0, heads, buffer)
    return {layer: t[index] for layer, t in paged.items()}


def fetcher(shared_memory: bool = True) -> KvFetcher:
    layout = ConsumerLayout(torch.float32, BLOCK, HEAD)
    return KvFetcher(layout, timeout_s=10, shared_memory=shared_memory)


def test_same_host_fetch_reads_the_file_and_release_unlinks_it(
    server: KvTransferServer, shm_reads: type[CountingReader]
) -> None:
    want_all = stage(server, "req")
    entry = server.staging.get("req")
    assert entry is not None and entry.buffer is not None
    path = shm.SHM_DIR / entry.buffer.name
    addr = f"127.0.0.1:{server.port}"
    want = SliceRequest("req", 0, 2, (0, 1), 0, 2, 1000)
    got = fetcher().fetch(addr, want)
    for layer in (0, 1):
        assert torch.equal(got.slices[(layer, 0, 2)], want_all[layer])
    nbytes = 2 * want_all[0].numel() * 4
    assert got.nbytes == got.shm_nbytes == nbytes
    assert shm_reads.reads == -(-want_all[0].numel() * 4 // 1000) * 2  # every chunk
    assert server.stats.bytes_sent == nbytes
    assert fetcher().release(addr, want)
    assert not path.exists()
    assert server.staging.totals() == (0, 0, 0)


def test_a_consumer_that_opts_out_gets_the_bytes_over_the_socket(
    server: KvTransferServer, shm_reads: type[CountingReader]
) -> None:
    want_all = stage(server, "req")
    want = SliceRequest("req", 0, 2, (1,), 0, 2, 4096)
    got = fetcher(shared_memory=False).fetch(f"127.0.0.1:{server.port}", want)
    assert torch.equal(got.slices[(1, 0, 2)], want_all[1])
    assert shm_reads.reads == 0 and got.shm_nbytes == 0 < got.nbytes


def test_a_head_window_of_shared_staging_is_streamed(
    server: KvTransferServer, shm_reads: type[CountingReader]
) -> None:
    want_all = stage(server, "req")
    want = SliceRequest("req", 0, 2, (0,), 1, 1, 4096)  # head 1 of 2: not contiguous
    slices = fetcher().fetch(f"127.0.0.1:{server.port}", want).slices
    assert torch.equal(slices[(0, 1, 1)], want_all[0][:, 1:2])
    assert shm_reads.reads == 0


def test_an_injected_fault_is_caught_and_the_staged_copy_stays_clean(
    server: KvTransferServer, shm_reads: type[CountingReader]
) -> None:
    want_all = stage(server, "req")
    server.service._corrupt_next = 1  # the InjectFault hook, in-process
    want = SliceRequest("req", 0, 2, (0,), 0, 2, 4096)
    with pytest.raises(KvIntegrityError):
        fetcher().fetch(f"127.0.0.1:{server.port}", want)
    slices = fetcher().fetch(f"127.0.0.1:{server.port}", want).slices
    assert torch.equal(slices[(0, 0, 2)], want_all[0])
    assert shm_reads.reads > 0


def test_expiry_drop_and_clear_unlink_the_files() -> None:
    now = [0.0]
    staging = Staging(5.0, clock=lambda: now[0])
    paths = []
    for name in ("a", "b", "c", "d"):
        layers, buffer = shm.BlockStager(shared=True).stage(
            {0: kv(2, 1, seed=1)}, torch.tensor([0])
        )
        assert buffer is not None
        staging.put(name, layers, 0, 1, buffer)
        paths.append(shm.SHM_DIR / buffer.name)
    assert all(p.exists() for p in paths)
    assert staging.drop("a") and not paths[0].exists()
    layers, buffer = shm.BlockStager(shared=True).stage({0: kv(2, 1, seed=2)}, torch.tensor([1]))
    staging.put("b", layers, 0, 1, buffer)  # staged again: the old copy goes
    assert not paths[1].exists()
    now[0] = 10.0
    assert {e.request_id for e in staging.expire()} == {"b", "c", "d"}
    assert not any(p.exists() for p in paths)
    layers, buffer = shm.BlockStager(shared=True).stage({0: kv(2, 1, seed=3)}, torch.tensor([1]))
    staging.put("e", layers, 0, 1, buffer)
    assert buffer is not None
    staging.clear()
    assert not (shm.SHM_DIR / buffer.name).exists()


def test_no_room_in_dev_shm_falls_back_to_private_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    def full(nbytes: int) -> shm.SharedBuffer:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shm, "SharedBuffer", full)
    paged = {0: kv(3, 2, seed=5)}
    layers, buffer = shm.BlockStager(shared=True).stage(paged, torch.tensor([2, 0]))
    assert buffer is None
    assert torch.equal(layers[0], paged[0][[2, 0]])


def test_sweep_removes_only_the_files_of_dead_processes() -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    mine = shm.SharedBuffer(64)
    stale = shm.SHM_DIR / mine.name.replace(f"-{os.getpid()}-", f"-{int(dead.stdout)}-", 1)
    stale.write_bytes(b"x")
    try:
        assert shm.sweep_stale() >= 1
        assert not stale.exists()
        assert (shm.SHM_DIR / mine.name).exists()
    finally:
        stale.unlink(missing_ok=True)
        mine.release()


def test_the_reader_refuses_foreign_and_missing_files() -> None:
    reader = shm.ShmReader()
    with pytest.raises(KvTransferError, match="unexpected shared-memory file"):
        reader.view("../etc/passwd", 0, 1)
    with pytest.raises(KvTransferError, match="is gone"):
        reader.view("pdserve-kv-0-1-2-none", 0, 1)
    buffer = shm.SharedBuffer(16)
    try:
        assert bytes(reader.view(buffer.name, 8, 8)) == bytes(8)
        with pytest.raises(KvTransferError, match="overruns"):
            reader.view(buffer.name, 8, 9)
    finally:
        buffer.release()


def test_staging_leaves_headroom_in_dev_shm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shm, "HEADROOM_FRACTION", 1.0)  # any allocation breaks the headroom
    with pytest.raises(OSError, match="too full"):
        shm.SharedBuffer(4096)
    layers, buffer = shm.BlockStager(shared=True).stage({0: kv(2, 1, seed=6)}, torch.tensor([1]))
    assert buffer is None and torch.equal(layers[0], kv(2, 1, seed=6)[[1]])


def test_shared_slices_are_read_in_place_and_private_to_the_consumer(
    server: KvTransferServer,
) -> None:
    want_all = stage(server, "req")
    arena = ReceiveArena()
    arena.reset(1 << 20)
    want = SliceRequest("req", 0, 2, (0,), 0, 2, 4096)
    slices = fetcher().fetch(f"127.0.0.1:{server.port}", want, arena).slices
    got = slices[(0, 0, 2)]
    assert torch.equal(got, want_all[0])
    assert arena.take((1,), torch.uint8).data_ptr() == arena._buffer.data_ptr()  # unused
    got.add_(1.0)  # the consumer's own copy-on-write pages, never the producer's staging
    entry = server.staging.get("req")
    assert entry is not None and torch.equal(entry.layers[0], want_all[0])
