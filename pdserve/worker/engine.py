"""The vLLM engine inside a worker: construction, generation, abort and load."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from pdserve.config import WorkerConfig
from pdserve.kv_transfer.base import KvTransport
from pdserve.kv_transfer.metadata import KvLayout
from pdserve.kv_transfer.vllm_patches import ENABLE_ENV as VLLM_PATCHES_ENV

# Reproducible across processes (CBOR, not pickle): the router recomputes prompt block
# hashes with it to match the engine's KV events (router/kv_index/hashing.py).
PREFIX_CACHING_HASH_ALGO = "sha256_cbor"


@dataclass
class LoadSnapshot:
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0


def engine_environment(config: WorkerConfig) -> dict[str, str]:
    """Environment variables vLLM reads at start-up for this worker."""
    env = {
        VLLM_PATCHES_ENV: "1",
        "VLLM_CPU_KVCACHE_SPACE": str(config.engine.kv_cache_space_gib),
        "VLLM_NIXL_SIDE_CHANNEL_PORT": str(config.kv_port),
        "VLLM_NIXL_SIDE_CHANNEL_HOST": config.host,
    }
    if config.cpu_bind:
        env["VLLM_CPU_OMP_THREADS_BIND"] = config.cpu_bind
    return env


def _load_logger_factory(snapshot: LoadSnapshot) -> Any:
    """A vLLM stat logger that copies the scheduler's load figures into ``snapshot``."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class LoadLogger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
        ) -> None:
            if scheduler_stats is not None:
                snapshot.running = scheduler_stats.num_running_reqs
                snapshot.waiting = scheduler_stats.num_waiting_reqs
                snapshot.kv_cache_usage = scheduler_stats.kv_cache_usage

        def log_engine_initialized(self) -> None:
            pass

    return LoadLogger


class Engine:
    """Owns one vLLM ``AsyncLLM`` (which owns its engine-core and TP/PP processes)."""

    def __init__(self, config: WorkerConfig, transport: KvTransport | None) -> None:
        self.config = config
        self.transport = transport
        self.load = LoadSnapshot()
        self._llm: Any = None
        self.layout: KvLayout | None = None

    def start(self) -> None:
        os.environ.update(engine_environment(self.config))
        from vllm.config import KVTransferConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        ec = self.config.engine
        kv_config = None
        if self.transport is not None:
            kv_config = KVTransferConfig(
                **self.transport.engine_kv_config(self.config.role, self.config.worker_id)
            )
        kv_events = None
        if self.config.kv_events_port is not None:
            from vllm.config import KVEventsConfig

            port = self.config.kv_events_port
            kv_events = KVEventsConfig(
                enable_kv_cache_events=True,
                publisher="zmq",
                # vLLM binds only wildcard PUB endpoints; the replay socket binds as given.
                endpoint=f"tcp://*:{port}",
                replay_endpoint=f"tcp://{self.config.host}:{port + 1}",
            )
        args = AsyncEngineArgs(
            model=ec.model_path,
            served_model_name=[ec.served_model_name],
            dtype=ec.dtype,
            max_model_len=ec.max_model_len,
            **ec.parallel_args(),
            enforce_eager=ec.eager(on_cpu=current_platform.is_cpu()),
            seed=ec.seed,
            kv_transfer_config=kv_config,
            kv_events_config=kv_events,
            enable_prefix_caching=True,
            prefix_caching_hash_algo=PREFIX_CACHING_HASH_ALGO,
            disable_log_stats=False,
        )
        self._llm = AsyncLLM.from_engine_args(args, stat_loggers=[_load_logger_factory(self.load)])
        self.layout = self._read_layout()

    def _read_layout(self) -> KvLayout:
        vc = self._llm.vllm_config
        mc, pc = vc.model_config, vc.parallel_config
        return KvLayout(
            model_id=self.config.engine.served_model_name,
            dtype=str(mc.dtype).removeprefix("torch."),
            block_size=int(vc.cache_config.block_size),
            num_layers=int(mc.hf_text_config.num_hidden_layers),
            num_kv_heads=int(mc.get_total_num_kv_heads()),
            head_size=int(mc.get_head_size()),
            tensor_parallel_size=int(pc.tensor_parallel_size),
            pipeline_parallel_size=int(pc.pipeline_parallel_size),
            hash_algorithm=f"vllm-{vc.cache_config.prefix_caching_hash_algo}",
        )

    @property
    def max_model_len(self) -> int:
        return int(self._llm.vllm_config.model_config.max_model_len)

    def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: Any,
        cache_salt: str | None = None,
    ) -> AsyncIterator[Any]:
        """vLLM ``RequestOutput`` deltas. Cancelling the iteration aborts the request.
        ``cache_salt``: prefix-cache blocks are shared only with requests of the same salt."""
        prompt: dict[str, Any] = {"prompt_token_ids": prompt_token_ids}
        if cache_salt:
            prompt["cache_salt"] = cache_salt
        result: AsyncIterator[Any] = self._llm.generate(prompt, sampling_params, request_id)
        return result

    async def abort(self, request_id: str) -> None:
        await self._llm.abort(request_id)

    async def check_health(self) -> None:
        await self._llm.check_health()

    def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None
