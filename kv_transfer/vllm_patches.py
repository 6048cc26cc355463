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

3. Idle engines that keep CPU cores busy (CPU hosts only). Two loops spin by design, to
   shave microseconds off GPU steps: NIXL's progress thread polls without pause (its
   Python API hard-codes ``pthrDelay = 0``), and every engine worker process spins on its
   shared-memory message queue for a second after each step. On a CPU host each engine
   then holds about two cores, even idle (measured: 4 threads at 75-92 % for an idle
   1P1D cluster on 2 cores), and the router and worker front-ends starve: requests stall
   for tens of seconds and health checks miss their deadlines. On CPU pdserve gives the
   progress thread a 1 ms pause between polls (NIXL's own ``pthrDelay``) and lets the
   queue reader spin 20 ms instead of
   1 s, rechecking every 50 ms while it sleeps (vLLM's wake-up notification can be lost,
   and its 5 s recheck then shows as 5 s stalls). A third loop: while a prefill engine
   waits for its blocks to be read (or a decode engine for its KV) and has nothing to
   compute, vLLM steps it every 1 ms only to poll the transfer; each step wakes all its
   workers, so a TP=2 prefill engine kept 1.5 cores busy and starved the decode engine
   that had to read from it (measured: 5 of 22 requests took 16-40 s, NIXL handshakes
   timed out, leases expired before the reads). pdserve pauses 25 ms after such a step
   (longer than the workers' spin, so they sleep). Set ``PDSERVE_SPIN_WAIT=1`` to keep
   vLLM's spinning. Remove when vLLM or NIXL expose these knobs.

4. NIXL re-pins the engine's compute thread (CPU hosts only). On CPU, the NIXL connector's
   worker "reserves" the last core of each NUMA node for KV transfers by calling
   ``os.sched_setaffinity(0, ...)`` in its constructor; that call pins the calling thread,
   which is the worker's main thread, the one that runs the model (OpenMP thread 0). Every
   engine with the connector then computes on the host's last core whatever
   ``VLLM_CPU_OMP_THREADS_BIND`` says: on 2 cores, a prefill and a decode engine shared
   core 1 while core 0 idled (measured: the prefill engine computed a batch ~5x slower
   than one plain vLLM; a colocated worker starved for 2 minutes beside a busy one; all four
   ranks of a TP2+PP2 cluster on one core). Fix: the constructor keeps the thread's
   affinity as it found it. OFF unless ``PDSERVE_KEEP_AFFINITY=1``: with it on, a decode
   worker added at run time under load stalls ~30 s in its first engine-core -> worker
   call and fails its first requests (reproduced 3/3 on an idle host; not understood, see
   docs/performance.md). Remove when vLLM stops re-pinning the model thread.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import importlib.util
import os
import queue
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

ENABLE_ENV = "PDSERVE_VLLM_PATCHES"
SPIN_WAIT_ENV = "PDSERVE_SPIN_WAIT"
KEEP_AFFINITY_ENV = "PDSERVE_KEEP_AFFINITY"  # patch 4, opt-in
_MARK = "_pdserve_patched"
_MODEL_RUNNER = "vllm.v1.worker.gpu_model_runner"
_SHM_QUEUE = "vllm.distributed.device_communicators.shm_broadcast"
_RECHECK = "SHM_READER_RECHECK_INTERVAL_MS"  # read by the queue at each wait
_NIXL_WORKER = "vllm.distributed.kv_transfer.kv_connector.v1.nixl.base_worker"
_NIXL_CONFIG = "nixl_agent_config"  # the name base_worker calls its agent config by
_ENGINE_CORE = "vllm.v1.engine.core"
# Pause of NIXL's progress thread between polls on CPU hosts. 1 ms: 0.07 s of CPU per
# 3 s idle instead of 2.9 s.
NIXL_PROGRESS_DELAY_US = 1000
# How long an engine worker spins for its next step before it sleeps (vLLM: 1 s), and how
# often a sleeping one rechecks its queue (vLLM: 5 s).
QUEUE_SPIN_S = 0.02
QUEUE_RECHECK_MS = 50
# How long an engine core pauses after a step that ran no model while requests still wait
# on KV transfers (vLLM: 1 ms). Longer than QUEUE_SPIN_S, so the engine's workers sleep
# between such steps instead of spinning.
IDLE_STEP_PAUSE_S = 0.025


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
    if not _on_cpu():
        return
    quiet = os.environ.get(SPIN_WAIT_ENV) != "1"
    keep_affinity = os.environ.get(KEEP_AFFINITY_ENV) == "1"
    if quiet:
        after_import(_SHM_QUEUE, _patch_queue_busy_loop)
        after_import(_ENGINE_CORE, _patch_idle_steps)

    def patch_nixl_worker(module: ModuleType) -> None:
        if keep_affinity:
            _patch_nixl_thread_affinity(module)
        if quiet:
            _patch_nixl_progress_thread(module)

    if quiet or keep_affinity:
        after_import(_NIXL_WORKER, patch_nixl_worker)


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def _patch_nixl_thread_affinity(module: ModuleType) -> None:
    """The NIXL worker's constructor leaves the calling thread's CPU affinity as it was."""

    def wrap(original: Callable[..., None]) -> Callable[..., None]:
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            before = os.sched_getaffinity(0)
            try:
                original(self, *args, **kwargs)
            finally:
                if os.sched_getaffinity(0) != before:
                    os.sched_setaffinity(0, before)

        return __init__

    _wrap_once(module.NixlBaseConnectorWorker, "__init__", wrap)


def _patch_queue_busy_loop(module: ModuleType) -> None:
    def wrap(original: Callable[..., None]) -> Callable[..., None]:
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            original(self, *args, **kwargs)
            self.busy_loop_s = min(self.busy_loop_s, QUEUE_SPIN_S)

        return __init__

    _wrap_once(module.SpinCondition, "__init__", wrap)
    # vLLM's notification can be lost (it says so), and a sleeping reader then rechecks
    # only every 5 s; readers that sleep often must recheck sooner.
    recheck_ms = min(getattr(module, _RECHECK), QUEUE_RECHECK_MS)
    setattr(module, _RECHECK, recheck_ms)


def _patch_idle_steps(module: ModuleType) -> None:
    """Pace the steps an engine takes only to poll KV transfers (nothing to compute).

    Such a step ran no model, has no batch in flight (pipeline parallelism) and nothing
    running, yet the scheduler holds requests: they wait for remote KV or for their
    blocks to be read."""

    def wrap(original: Callable[..., bool]) -> Callable[..., bool]:
        def _process_engine_step(self: Any) -> bool:
            model_executed = original(self)
            if (
                not model_executed
                and not self.batch_queue
                and not self.scheduler.running
                and self.scheduler.has_requests()
            ):
                pause_unless_input(self.input_queue, IDLE_STEP_PAUSE_S)
            return model_executed

        return _process_engine_step

    _wrap_once(module.EngineCoreProc, "_process_engine_step", wrap)


def pause_unless_input(inputs: queue.Queue[Any], seconds: float) -> None:
    """Wait ``seconds``, or less if the engine's input queue has (or gets) a message: a new
    request or an abort is never held back by the pause."""
    with inputs.not_empty:
        inputs.not_empty.wait_for(lambda: bool(inputs.queue), timeout=seconds)


def _patch_nixl_progress_thread(module: ModuleType) -> None:
    """Make NIXL's progress thread wait up to NIXL_PROGRESS_DELAY_US between polls."""
    make_config = getattr(module, _NIXL_CONFIG, None)
    if make_config is None:
        return
    bind = sys.modules[make_config.__module__].nixlBind
    native = bind.nixlAgentConfig
    if getattr(native, _MARK, False):
        return

    class PacedAgentConfig(native):  # type: ignore[misc,valid-type]
        pass

    # The agent sets pthrDelay = 0 (poll without pause); keep at least our delay.
    PacedAgentConfig.pthrDelay = property(
        native.pthrDelay.fget,
        lambda self, us: native.pthrDelay.fset(self, max(int(us), NIXL_PROGRESS_DELAY_US)),
    )
    setattr(PacedAgentConfig, _MARK, True)
    bind.nixlAgentConfig = PacedAgentConfig


def _patch_consumer_count() -> None:
    from vllm.distributed.kv_transfer.kv_connector import utils

    def wrap(original: Callable[..., int]) -> Callable[..., int]:
        def dcp_consumer_count(self: Any, remote_tp_size: int, remote_dcp_size: int) -> int:
            from vllm.distributed.parallel_state import get_pp_group

            count = original(self, remote_tp_size, remote_dcp_size)
            return consumers_with_pp(count, get_pp_group().world_size)

        return dcp_consumer_count

    _wrap_once(utils.TransferTopology, "dcp_consumer_count", wrap)


def _patch_intermediate_tensors(module: ModuleType) -> None:
    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def sync_and_gather_intermediate_tensors(self: Any, num_tokens: int, *args: Any) -> Any:
            if self.intermediate_tensors is None:
                self.intermediate_tensors = self.model.make_empty_intermediate_tensors(
                    batch_size=self.max_num_tokens,
                    dtype=self.model_config.dtype,
                    device=self.device,
                )
            return original(self, num_tokens, *args)

        return sync_and_gather_intermediate_tensors

    _wrap_once(module.GPUModelRunner, "sync_and_gather_intermediate_tensors", wrap)


def _wrap_once(
    owner: Any, name: str, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]
) -> None:
    """Replace ``owner.name`` by ``wrap(original)``, unless it is already wrapped."""
    original = getattr(owner, name)
    if getattr(original, _MARK, False):
        return
    wrapped = functools.wraps(original)(wrap(original))
    setattr(wrapped, _MARK, True)
    setattr(owner, name, wrapped)


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
