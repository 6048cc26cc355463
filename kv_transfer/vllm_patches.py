"""Narrow fixes for vLLM 0.32 that pdserve workers need; each says when to remove it.

Loaded into every vLLM process through the `vllm.general_plugins` entry point, and active
only in pdserve workers (which set PDSERVE_VLLM_PATCHES=1), so plain vLLM in the same
environment is untouched.

1. NIXL pull mode with a pipeline-parallel decode engine. Every decode rank that reads a
   request's blocks notifies the prefill rank it read from, and the notification says how
   many readers the prefill rank must wait for before it frees the blocks. vLLM computes
   that count from TP (and DCP) sizes only (`TransferTopology.dcp_consumer_count`), so
   with decode PP=2 both pipeline stages read but the producer frees the blocks after the
   first stage's notification; the second stage's read can then see blocks already reused
   by another request (observed: garbage tokens under load, and
   `vllm:nixl_num_notifications_after_expiry_total` counting the late notifications on
   the prefill engine). Fix: multiply the count by the local pipeline-parallel size.
   Remove when vLLM counts pipeline stages itself.

2. Pipeline parallelism with `enforce_eager` on CPU. The buffer that receives the
   previous stage's hidden states (`GPUModelRunner.intermediate_tensors`) is allocated
   only by the warm-up dummy run, which the CPU runner skips when compilation is off, so
   every non-first stage fails its first step (`assert self.intermediate_tensors is not
   None`). Without the fix PP needs the torch.compile path, which takes minutes to start
   on small CPUs. Fix: allocate the buffer on first use, exactly as the dummy run does.
   Remove when vLLM allocates it outside the warm-up.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

ENABLE_ENV = "PDSERVE_VLLM_PATCHES"
_MARK = "_pdserve_patched"
_MODEL_RUNNER = "vllm.v1.worker.gpu_model_runner"


def consumers_with_pp(count: int, local_pp_size: int) -> int:
    """Readers a producer rank must wait for, when each of ``local_pp_size`` stages reads."""
    return count * max(1, local_pp_size)


def register() -> None:
    """vLLM general-plugin hook (runs in the engine-core and every worker process)."""
    if os.environ.get(ENABLE_ENV) != "1":
        return
    _patch_consumer_count()
    # The model runner is heavy to import (tens of seconds on a small CPU) and only the
    # engine's worker processes need it: patch it when, and if, they import it.
    after_import(_MODEL_RUNNER, _patch_intermediate_tensors)


def _patch_consumer_count() -> None:
    from vllm.distributed.kv_transfer.kv_connector import utils

    original = utils.TransferTopology.dcp_consumer_count
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def dcp_consumer_count(self: Any, remote_tp_size: int, remote_dcp_size: int) -> int:
        from vllm.distributed.parallel_state import get_pp_group

        count = original(self, remote_tp_size, remote_dcp_size)
        return consumers_with_pp(count, get_pp_group().world_size)

    setattr(dcp_consumer_count, _MARK, True)
    utils.TransferTopology.dcp_consumer_count = dcp_consumer_count


def _patch_intermediate_tensors(module: ModuleType) -> None:
    runner = module.GPUModelRunner
    original = runner.sync_and_gather_intermediate_tensors
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def sync_and_gather_intermediate_tensors(self: Any, num_tokens: int, *args: Any) -> Any:
        if self.intermediate_tensors is None:
            self.intermediate_tensors = self.model.make_empty_intermediate_tensors(
                batch_size=self.max_num_tokens,
                dtype=self.model_config.dtype,
                device=self.device,
            )
        return original(self, num_tokens, *args)

    setattr(sync_and_gather_intermediate_tensors, _MARK, True)
    runner.sync_and_gather_intermediate_tensors = sync_and_gather_intermediate_tensors


def after_import(name: str, patch: Callable[[ModuleType], None]) -> None:
    """Run ``patch(module)`` once module ``name`` is imported (now, if it already is)."""
    if name in sys.modules:
        patch(sys.modules[name])
        return
    sys.meta_path.insert(0, _PatchOnImport(name, patch))


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def __init__(self, name: str, patch: Callable[[ModuleType], None]) -> None:
        self.name = name
        self.patch = patch

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # find the real spec with the other finders
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module
        patch = self.patch

        def exec_and_patch(module: ModuleType) -> None:
            exec_module(module)
            patch(module)

        loader.exec_module = exec_and_patch  # type: ignore[method-assign]
        return spec
