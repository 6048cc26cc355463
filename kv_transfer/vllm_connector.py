"""pdserve's own vLLM KV connector: KV over gRPC, staged under a lease.

Loaded by vLLM through ``kv_connector_module_path="pdserve.kv_transfer.vllm_connector"``
(``kv_connector="GrpcKvConnector"``); the worker's ``grpc`` transport configures it.

Producer (a request with ``do_remote_decode``): in the step that computes the last
prompt tokens, the scheduler side names the request's blocks; after the forward pass
(``wait_for_save``) each engine rank copies those blocks of its layers and KV heads out
of the paged cache into its staging area, served by the rank's KvTransfer gRPC server
(on ``port + rank``, started inside the engine process). The engine frees its blocks at
once; the staged copy lives until every cell is confirmed or the lease runs out.
``request_finished`` returns the parameters a decode engine needs.

Consumer (a request with ``do_remote_prefill``): the scheduler side reports the prompt
minus its last token as externally computed; each engine rank fetches the layers and KV
heads it owns from every producer rank (which answers with its intersection, so TP and
PP shapes may differ on the two sides), verifies every chunk's XXH3 hash, checks that the
slices cover its layers and heads, writes them into the allocated blocks and confirms.
This first version loads synchronously in ``start_load_kv`` (before the forward pass
that needs the KV; it blocks that engine step). A failed load reports its blocks as
invalid and vLLM fails the request (``kv_load_failure_policy="fail"``).
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from pdserve.config import TlsConfig
from pdserve.kv_transfer.chunks import DEFAULT_CHUNK_BYTES, ReceiveArena
from pdserve.kv_transfer.grpc_client import (
    ConsumerLayout,
    KvFetcher,
    SliceRequest,
    failure_reason,
    release_everything,
)
from pdserve.kv_transfer.grpc_server import FAULT_INJECTION_ENV, KvTransferServer, RankLayout
from pdserve.kv_transfer.shm import BlockStager

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger(__name__)

_LAYER_INDEX = re.compile(r"layers\.(\d+)\.")


@dataclass(frozen=True)
class SaveSpec:
    request_id: str
    block_ids: tuple[int, ...]


@dataclass(frozen=True)
class LoadSpec:
    request_id: str
    local_block_ids: tuple[int, ...]
    first_block: int
    remote_host: str
    remote_port: int
    remote_ranks: int
    remote_request_id: str


@dataclass
class GrpcConnectorMetadata(KVConnectorMetadata):
    saves: list[SaveSpec] = field(default_factory=list)
    loads: list[LoadSpec] = field(default_factory=list)


@dataclass(frozen=True)
class ConnectorSettings:
    """``kv_connector_extra_config`` of this connector."""

    host: str
    port: int
    lease_s: float
    chunk_bytes: int
    fetch_timeout_s: float
    tls: TlsConfig | None = None
    # Stage in /dev/shm and read a same-host producer's staging from there (ADR 0015).
    shared_memory: bool = True

    @classmethod
    def from_extra(cls, extra: dict[str, Any]) -> ConnectorSettings:
        tls = extra.get("tls")
        return cls(
            host=str(extra.get("host", "127.0.0.1")),
            port=int(extra.get("port", 5600)),
            lease_s=float(extra.get("lease_s", 30.0)),
            chunk_bytes=int(extra.get("chunk_bytes", DEFAULT_CHUNK_BYTES)),
            fetch_timeout_s=float(extra.get("fetch_timeout_s", 30.0)),
            tls=TlsConfig(**tls) if tls else None,
            shared_memory=bool(extra.get("shared_memory", True)),
        )


def layer_index(name: str) -> int:
    match = _LAYER_INDEX.search(name)
    if match is None:
        raise ValueError(f"cannot tell the layer index of KV cache {name!r}")
    return int(match.group(1))


class GrpcKvConnector(KVConnectorBase_V1):
    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        self.settings = ConnectorSettings.from_extra(
            dict(self._kv_transfer_config.kv_connector_extra_config)
        )
        self.block_size = int(vllm_config.cache_config.block_size)
        self.world_size = int(vllm_config.parallel_config.world_size)
        # Scheduler side.
        self._producing: dict[str, Request] = {}
        self._saved: set[str] = set()
        self._pending_external: dict[str, int] = {}
        self._loads: list[LoadSpec] = []
        # Worker side.
        self._kv: dict[int, torch.Tensor] = {}
        self._head_start = 0
        self._head_count = 0
        self._server: KvTransferServer | None = None
        self._fetcher: KvFetcher | None = None
        self._stager = BlockStager(self.settings.shared_memory)
        self._arena = ReceiveArena()
        self._load_errors: set[int] = set()

    # ---------------------------------------------------------------- scheduler side

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        params = request.kv_transfer_params or {}
        if not params.get("do_remote_prefill"):
            return 0, False
        # The last prompt token is recomputed here: its logits give the first token.
        count = max(0, len(request.prompt_token_ids or ()) - 1 - num_computed_tokens)
        if count:
            self._pending_external[request.request_id] = num_computed_tokens
        else:
            self._release_unused(params)  # this engine's prefix cache holds the prompt
        return count, False

    def _release_unused(self, params: dict[str, Any]) -> None:
        """Free a producer's staged copy this engine will not read (do not wait for it)."""
        params["do_remote_prefill"] = False
        try:
            target = (str(params["remote_host"]), int(params["remote_port"]))
            ranks, request_id = int(params["remote_ranks"]), str(params["remote_request_id"])
        except (KeyError, TypeError, ValueError):
            return  # unusable parameters: the producer's lease frees the copy
        threading.Thread(
            target=release_everything,
            args=(*target, ranks, request_id, self.settings.fetch_timeout_s, self.settings.tls),
            name="kv-release",
            daemon=True,
        ).start()

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        params = request.kv_transfer_params or {}
        if params.get("do_remote_decode"):
            self._producing[request.request_id] = request
        local_computed = self._pending_external.pop(request.request_id, None)
        if local_computed is None:
            return
        if num_external_tokens == 0:
            self._release_unused(params)  # vLLM kept a longer local hit instead
            return
        first = local_computed // self.block_size
        last = math.ceil((local_computed + num_external_tokens) / self.block_size)
        block_ids = blocks.get_block_ids()[0]
        self._loads.append(
            LoadSpec(
                request_id=request.request_id,
                local_block_ids=tuple(block_ids[first:last]),
                first_block=first,
                remote_host=str(params["remote_host"]),
                remote_port=int(params["remote_port"]),
                remote_ranks=int(params["remote_ranks"]),
                remote_request_id=str(params["remote_request_id"]),
            )
        )
        # Never load twice (e.g. after a preemption the prompt is recomputed locally).
        params["do_remote_prefill"] = False

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = GrpcConnectorMetadata(loads=self._loads)
        self._loads = []
        scheduled = scheduler_output.num_scheduled_tokens
        for req_id, request in self._producing.items():
            if req_id in self._saved or req_id not in scheduled:
                continue
            prompt_len = len(request.prompt_token_ids or ())
            if request.num_computed_tokens + scheduled[req_id] < prompt_len:
                continue  # a chunked prefill: not the last chunk yet
            assert self._kv_cache_manager is not None
            block_ids = self._kv_cache_manager.get_block_ids(req_id)[0]
            meta.saves.append(
                SaveSpec(req_id, tuple(block_ids[: math.ceil(prompt_len / self.block_size)]))
            )
            self._saved.add(req_id)
        return meta

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        self._producing.pop(request.request_id, None)
        self._pending_external.pop(request.request_id, None)
        params = request.kv_transfer_params or {}
        if params.get("do_remote_prefill"):
            self._release_unused(params)  # finished (aborted) before its KV was loaded
        if request.request_id not in self._saved:
            return False, None
        self._saved.discard(request.request_id)
        prompt_len = len(request.prompt_token_ids or ())
        # The blocks were copied out in the step that computed them: vLLM may free them.
        return False, {
            "remote_host": self.settings.host,
            "remote_port": self.settings.port,
            "remote_ranks": self.world_size,
            "remote_request_id": request.request_id,
            "remote_num_blocks": math.ceil(prompt_len / self.block_size),
        }

    # ---------------------------------------------------------------- worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.distributed.parallel_state import get_pp_group, get_tp_group

        self._kv = {layer_index(name): tensor for name, tensor in kv_caches.items()}
        sample = next(iter(self._kv.values()))
        # CPU attention: per layer [num_blocks, kv_heads_of_this_rank, block_size, 2*head].
        if sample.dim() != 4 or sample.shape[2] != self.block_size:
            raise RuntimeError(f"unexpected KV cache layout {tuple(sample.shape)}")
        tp_rank, tp_size = get_tp_group().rank_in_group, get_tp_group().world_size
        total_heads = self._vllm_config.model_config.get_total_num_kv_heads()
        self._head_count = int(sample.shape[1])
        # Heads are split evenly over TP ranks; with more ranks than heads they repeat.
        self._head_start = tp_rank * total_heads // tp_size
        rank = get_pp_group().rank_in_group * tp_size + tp_rank
        head_size = int(self._vllm_config.model_config.get_head_size())
        dtype = sample.dtype
        self._server = KvTransferServer(
            self.settings.host,
            self.settings.port + rank,
            self.settings.lease_s,
            RankLayout(str(dtype).removeprefix("torch."), self.block_size, head_size),
            allow_faults=os.environ.get(FAULT_INJECTION_ENV) == "1",
            tls=self.settings.tls,
        )
        self._server.start()
        self._fetcher = KvFetcher(
            ConsumerLayout(dtype, self.block_size, head_size),
            self.settings.fetch_timeout_s,
            self.settings.tls,
            shared_memory=self.settings.shared_memory,
        )
        log.info(
            "KV transfer rank %d serving on %s:%d: layers %s, heads %d..%d, cache %s",
            rank,
            self.settings.host,
            self.settings.port + rank,
            sorted(self._kv),
            self._head_start,
            self._head_start + self._head_count - 1,
            tuple(sample.shape),
        )

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, GrpcConnectorMetadata)
        for spec in meta.loads:
            started = time.monotonic()
            try:
                nbytes, shm_nbytes = self._load(spec)
            except Exception as e:
                assert self._server is not None
                self._server.stats.failed(failure_reason(e))
                self._load_errors.update(spec.local_block_ids)
                log.error("KV load for request %s failed: %s", spec.request_id, e)
                continue
            assert self._server is not None
            self._server.stats.received(nbytes, time.monotonic() - started, shm_nbytes)

    def _load(self, spec: LoadSpec) -> tuple[int, int]:
        """Fetch, check and store one request's KV; returns (bytes, of which via shm)."""
        assert self._fetcher is not None
        want = SliceRequest(
            request_id=spec.remote_request_id,
            first_block=spec.first_block,
            num_blocks=len(spec.local_block_ids),
            layers=tuple(sorted(self._kv)),
            head_start=self._head_start,
            head_count=self._head_count,
            chunk_bytes=self.settings.chunk_bytes,
        )
        received: dict[tuple[int, int, int], torch.Tensor] = {}
        sources = []
        nbytes = shm_nbytes = 0
        # Every layer's share of this rank's cache for the request's blocks.
        row_bytes = sum(kv[0].numel() * kv.element_size() for kv in self._kv.values())
        self._arena.reset(row_bytes * want.num_blocks)
        for rank in range(spec.remote_ranks):
            target = f"{spec.remote_host}:{spec.remote_port + rank}"
            got = self._fetcher.fetch(target, want, self._arena)
            if got.slices:
                sources.append(target)
            received.update(got.slices)
            nbytes += got.nbytes
            shm_nbytes += got.shm_nbytes
        self._check_coverage(received)
        index = torch.tensor(spec.local_block_ids, dtype=torch.long)
        for (layer, head_start, head_count), data in received.items():
            lo = head_start - self._head_start
            self._kv[layer][index, lo : lo + head_count] = data
        for target in sources:
            self._fetcher.release(target, want)
        return nbytes, shm_nbytes

    def _check_coverage(self, received: dict[tuple[int, int, int], torch.Tensor]) -> None:
        from pdserve.errors import KvTransferError

        have = {
            (layer, head)
            for layer, start, count in received
            for head in range(start, start + count)
        }
        heads = range(self._head_start, self._head_start + self._head_count)
        missing = {(layer, head) for layer in self._kv for head in heads} - have
        if missing:
            raise KvTransferError(
                f"producer ranks did not supply KV for (layer, head) cells {sorted(missing)[:8]}"
            )

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        return

    def wait_for_save(self) -> None:
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, GrpcConnectorMetadata)
        for spec in meta.saves:
            assert self._server is not None
            index = torch.tensor(spec.block_ids, dtype=torch.long)
            layers, buffer = self._stager.stage(self._kv, index)
            self._server.staging.put(
                spec.request_id, layers, self._head_start, self._head_count, buffer
            )

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
