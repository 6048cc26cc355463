"""Same-host shared memory for staged KV: the grpc transport's fast path (ADR 0015).

A producer rank stages a request's KV in a file under /dev/shm instead of private memory
(the same one copy out of the paged cache). When a consumer that can open that file asks
(its ``host_token`` equals the producer's), ``Fetch`` streams chunk *descriptors* (file,
offset, length, XXH3 hash) instead of chunk bytes; the consumer maps the file privately
(copy-on-write), checks each hash and uses the bytes in place. The gRPC stream, the
hashes, the leases and Release are unchanged; only the payload no longer crosses a socket.

Ownership: the producer creates and unlinks every file (when the staged copy is freed:
confirmed, dropped, expired, or the server stops); a consumer only maps it for the
duration of one fetch. Mappings outlive an unlink, so a consumer mid-read is never cut
short. Files are 0600 and named ``pdserve-kv-<pid namespace>-<pid>-<random>``; a starting
server removes the files of dead processes of its own pid namespace (a crashed engine).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import secrets
from collections.abc import Mapping
from functools import cache
from pathlib import Path

import torch

from pdserve.errors import KvTransferError

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
_PREFIX = "pdserve-kv-"
# Staged KV never takes /dev/shm below this much free space: vLLM's rank queues, UCX and
# torch also live there, and they fail hard where staged KV would just use the heap.
HEADROOM_FRACTION = 0.25


def tensor_nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes of a contiguous tensor of ``shape`` in ``dtype``."""
    return int(torch.Size(shape).numel()) * dtype.itemsize


@cache
def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "0"


@cache
def host_token() -> str:
    """Who can open this process's shared KV files: same boot, same /dev/shm mount, same
    user. Empty where there is no /dev/shm (the fast path is then never offered)."""
    try:
        shm = SHM_DIR.stat()
    except OSError:
        return ""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = os.uname().nodename
    return f"{boot}:{shm.st_dev}:{shm.st_ino}:{os.getuid()}"


class SharedBuffer:
    """A zero-filled file in /dev/shm, mapped into this process as a uint8 tensor.

    Space is reserved up front (posix_fallocate), so a full /dev/shm is an OSError here
    and never a SIGBUS on a later write; so is one that would be left with less than
    ``HEADROOM_FRACTION`` of its size free.
    """

    def __init__(self, nbytes: int) -> None:
        if nbytes <= 0:
            raise ValueError("a shared buffer needs at least one byte")
        fs = os.statvfs(SHM_DIR)
        if (fs.f_bavail * fs.f_frsize - nbytes) < HEADROOM_FRACTION * fs.f_blocks * fs.f_frsize:
            raise OSError(errno.ENOSPC, f"{nbytes} bytes would leave {SHM_DIR} too full")
        self.name = f"{_PREFIX}{_pid_namespace()}-{os.getpid()}-{secrets.token_hex(8)}"
        path = SHM_DIR / self.name
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, nbytes)
            mapped = mmap.mmap(fd, nbytes)
        except OSError:
            path.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        # The tensor keeps the mapping alive; the pages go when the file is unlinked and
        # the last tensor viewing them is gone.
        self.bytes = torch.frombuffer(mapped, dtype=torch.uint8)
        self.nbytes = nbytes

    def offset_of(self, tensor: torch.Tensor) -> int | None:
        """Byte offset of a contiguous view of this buffer, None for anything else."""
        if not tensor.is_contiguous():
            return None
        offset = tensor.data_ptr() - self.bytes.data_ptr()
        size = tensor.numel() * tensor.element_size()
        return offset if offset >= 0 and offset + size <= self.nbytes else None

    def release(self) -> None:
        """Unlink the file (idempotent). Open mappings stay valid until dropped."""
        (SHM_DIR / self.name).unlink(missing_ok=True)


class BlockStager:
    """Copies a request's blocks out of the paged cache into one staging buffer: a file
    in /dev/shm when ``shared`` (falling back to private memory when /dev/shm has no
    room, which it logs once), else private memory. One per engine rank."""

    def __init__(self, shared: bool) -> None:
        self.shared = shared
        self._warned = False

    def stage(
        self, sources: Mapping[int, torch.Tensor], index: torch.Tensor
    ) -> tuple[dict[int, torch.Tensor], SharedBuffer | None]:
        """Blocks ``index`` of every layer; the buffer they live in, if shared."""
        if not self.shared or not sources or len(index) == 0:
            return _private_copy(sources, index), None
        shapes = {layer: (len(index), *kv.shape[1:]) for layer, kv in sources.items()}
        sizes = {
            layer: tensor_nbytes(shape, sources[layer].dtype) for layer, shape in shapes.items()
        }
        try:
            buffer = SharedBuffer(sum(sizes.values()))
        except OSError as e:
            if not self._warned:
                self._warned = True
                log.warning(
                    "no room in %s for staged KV (%s): staging in private memory", SHM_DIR, e
                )
            return _private_copy(sources, index), None
        layers, offset = {}, 0
        for layer, kv in sources.items():
            out = buffer.bytes[offset : offset + sizes[layer]].view(kv.dtype).view(shapes[layer])
            torch.index_select(kv, 0, index, out=out)
            layers[layer] = out
            offset += sizes[layer]
        return layers, buffer


def _private_copy(
    sources: Mapping[int, torch.Tensor], index: torch.Tensor
) -> dict[int, torch.Tensor]:
    return {layer: kv.index_select(0, index) for layer, kv in sources.items()}


class ShmReader:
    """The consumer's mappings of producer files, for one fetch.

    Private (copy-on-write) mappings: the consumer reads the producer's pages in place
    and may wrap them as tensors; anything it wrote would go to its own copy, never to
    the producer's staging.
    """

    def __init__(self) -> None:
        self._maps: dict[str, mmap.mmap] = {}

    def view(self, name: str, offset: int, nbytes: int) -> memoryview:
        return memoryview(self._map(name, offset + nbytes))[offset : offset + nbytes]

    def tensor(
        self, name: str, offset: int, shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        """Bytes ``offset``.. of the file as a tensor, without copying them."""
        nbytes = tensor_nbytes(shape, dtype)
        mapped = self._map(name, offset + nbytes)
        flat = torch.frombuffer(mapped, dtype=torch.uint8, count=nbytes, offset=offset)
        return flat.view(dtype).view(shape)

    def _map(self, name: str, end: int) -> mmap.mmap:
        """The file's mapping (made once per fetch), which must hold ``end`` bytes."""
        if not name.startswith(_PREFIX) or "/" in name:
            raise KvTransferError(f"producer named an unexpected shared-memory file {name!r}")
        buf = self._maps.get(name)
        if buf is None:
            try:
                fd = os.open(SHM_DIR / name, os.O_RDONLY)
            except OSError as e:
                raise KvTransferError(
                    f"staged KV in {SHM_DIR / name} is gone (lease expired?): {e}"
                ) from e
            try:
                buf = mmap.mmap(fd, os.fstat(fd).st_size, access=mmap.ACCESS_COPY)
            finally:
                os.close(fd)
            self._maps[name] = buf
        if end > len(buf):
            raise KvTransferError(f"KV chunk overruns shared-memory file {name}")
        return buf


def sweep_stale() -> int:
    """Remove the files of dead processes of this pid namespace; returns how many."""
    mine = f"{_PREFIX}{_pid_namespace()}-"
    removed = 0
    with contextlib.suppress(OSError):
        for path in SHM_DIR.glob(mine + "*"):
            pid_text = path.name.removeprefix(mine).split("-", 1)[0]
            if not pid_text.isdigit() or _alive(int(pid_text)):
                continue
            with contextlib.suppress(OSError):
                path.unlink()
                removed += 1
    if removed:
        log.info("removed %d shared-memory KV files left by dead processes", removed)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
