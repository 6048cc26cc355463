"""pdserve's vLLM fixes are narrow: opt-in only, each applied once, at the right time."""

from __future__ import annotations

import importlib
import os
import sys
import threading
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

from pdserve.kv_transfer import vllm_patches


def test_each_pipeline_stage_is_a_reader() -> None:
    assert vllm_patches.consumers_with_pp(1, 2) == 2
    assert vllm_patches.consumers_with_pp(2, 1) == 2
    assert vllm_patches.consumers_with_pp(1, 0) == 1


def test_register_is_a_no_op_outside_pdserve_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.distributed.kv_transfer.kv_connector import utils

    monkeypatch.delenv(vllm_patches.ENABLE_ENV, raising=False)
    original = utils.TransferTopology.dcp_consumer_count
    vllm_patches.register()
    assert utils.TransferTopology.dcp_consumer_count is original


def test_register_wraps_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.distributed.kv_transfer.kv_connector import utils

    deferred: list[str] = []
    monkeypatch.setattr(vllm_patches, "after_import", lambda name, patch: deferred.append(name))

    original = utils.TransferTopology.dcp_consumer_count
    monkeypatch.setenv(vllm_patches.ENABLE_ENV, "1")
    monkeypatch.setenv(vllm_patches.SPIN_WAIT_ENV, "1")  # the CPU-only fixes: tested below
    monkeypatch.delenv(vllm_patches.KEEP_AFFINITY_ENV, raising=False)
    monkeypatch.setattr(utils.TransferTopology, "dcp_consumer_count", original)
    vllm_patches.register()
    patched = utils.TransferTopology.dcp_consumer_count
    assert patched is not original and patched.__wrapped__ is original  # type: ignore[attr-defined]
    vllm_patches.register()
    assert utils.TransferTopology.dcp_consumer_count is patched
    # The model-runner fix waits for the (heavy) model runner's own import.
    assert deferred == [vllm_patches._MODEL_RUNNER] * 2


def test_after_import_patches_on_first_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "pdserve_patch_target.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    seen: list[int] = []

    def patch(module: ModuleType) -> None:
        seen.append(module.VALUE)
        module.VALUE = 2

    vllm_patches.after_import("pdserve_patch_target", patch)
    assert seen == []  # nothing imported yet
    try:
        module = importlib.import_module("pdserve_patch_target")
        assert (seen, module.VALUE) == ([1], 2)
        vllm_patches.after_import("pdserve_patch_target", patch)  # already imported: now
        assert seen == [1, 2]
    finally:
        sys.modules.pop("pdserve_patch_target", None)


def test_pipeline_stage_buffer_is_allocated_on_first_use() -> None:
    calls: list[int] = []

    class Runner:
        intermediate_tensors: object = None
        max_num_tokens, model_config, device = 64, SimpleNamespace(dtype="float32"), "cpu"

        class model:  # stands in for the vLLM model object
            @staticmethod
            def make_empty_intermediate_tensors(batch_size: int, dtype: str, device: str) -> str:
                return f"buffer[{batch_size},{dtype},{device}]"

        def sync_and_gather_intermediate_tensors(self, num_tokens: int, *args: object) -> object:
            calls.append(num_tokens)
            return self.intermediate_tensors

    vllm_patches._patch_intermediate_tensors(SimpleNamespace(GPUModelRunner=Runner))  # type: ignore[arg-type]
    runner = Runner()
    assert runner.sync_and_gather_intermediate_tensors(8, None, False) == "buffer[64,float32,cpu]"
    runner.intermediate_tensors = "existing"
    assert runner.sync_and_gather_intermediate_tensors(4, None, True) == "existing"
    assert calls == [8, 4]


def test_cpu_engines_wait_instead_of_spinning(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPU (this machine) the queue reader and the NIXL agent are patched on import;
    PDSERVE_SPIN_WAIT=1 keeps vLLM's spinning."""
    from vllm.platforms import current_platform

    assert current_platform.is_cpu()
    deferred: list[str] = []
    monkeypatch.setattr(vllm_patches, "after_import", lambda name, patch: deferred.append(name))
    monkeypatch.setenv(vllm_patches.ENABLE_ENV, "1")
    monkeypatch.delenv(vllm_patches.SPIN_WAIT_ENV, raising=False)
    monkeypatch.delenv(vllm_patches.KEEP_AFFINITY_ENV, raising=False)
    vllm_patches.register()
    quiet = [vllm_patches._SHM_QUEUE, vllm_patches._ENGINE_CORE, vllm_patches._NIXL_WORKER]
    assert deferred[1:] == quiet
    monkeypatch.setenv(vllm_patches.SPIN_WAIT_ENV, "1")
    vllm_patches.register()
    assert deferred[4:] == [vllm_patches._MODEL_RUNNER]
    # The affinity fix (opt-in) also waits for the NIXL worker's module.
    monkeypatch.setenv(vllm_patches.KEEP_AFFINITY_ENV, "1")
    vllm_patches.register()
    assert deferred[5:] == [vllm_patches._MODEL_RUNNER, vllm_patches._NIXL_WORKER]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two usable cores")
def test_nixl_worker_does_not_repin_the_model_thread() -> None:
    """vLLM's CPU NIXL worker pins the calling thread (the model's) to the last core; the
    patch puts the thread's affinity back, in a thread of its own so the test runner's
    affinity is never touched."""
    cores = sorted(os.sched_getaffinity(0))

    class FakeNixlWorker:
        def __init__(self) -> None:
            os.sched_setaffinity(0, {cores[-1]})  # what vLLM 0.32 does on CPU

    module = SimpleNamespace(NixlBaseConnectorWorker=FakeNixlWorker)
    vllm_patches._patch_nixl_thread_affinity(module)  # type: ignore[arg-type]
    seen: dict[str, set[int]] = {}

    def model_thread() -> None:
        os.sched_setaffinity(0, {cores[0]})  # the OpenMP binding of thread 0
        module.NixlBaseConnectorWorker()
        seen["after"] = os.sched_getaffinity(0)

    thread = threading.Thread(target=model_thread)
    thread.start()
    thread.join()
    assert seen["after"] == {cores[0]}
    assert os.sched_getaffinity(0) == set(cores)


def test_queue_reader_spins_briefly_and_rechecks_often() -> None:
    import inspect

    from vllm.distributed.device_communicators import shm_broadcast

    # The knob the fix overrides is still vLLM's: a reader spins busy_loop_s after a read.
    default = inspect.signature(shm_broadcast.SpinCondition.__init__).parameters["busy_loop_s"]
    assert default.default == 1

    class SpinCondition:  # stands in for vLLM's (whose sockets need a live engine)
        def __init__(self, is_reader: bool, busy_loop_s: float = 1) -> None:
            self.busy_loop_s = busy_loop_s

    assert shm_broadcast.SHM_READER_RECHECK_INTERVAL_MS == 5000  # vLLM's, unpatched here
    module = SimpleNamespace(SpinCondition=SpinCondition, SHM_READER_RECHECK_INTERVAL_MS=5000)
    vllm_patches._patch_queue_busy_loop(module)  # type: ignore[arg-type]
    patched = SpinCondition.__init__
    vllm_patches._patch_queue_busy_loop(module)  # type: ignore[arg-type]
    assert SpinCondition.__init__ is patched  # once only
    assert SpinCondition(True).busy_loop_s == vllm_patches.QUEUE_SPIN_S
    assert SpinCondition(True, busy_loop_s=0).busy_loop_s == 0
    assert module.SHM_READER_RECHECK_INTERVAL_MS == vllm_patches.QUEUE_RECHECK_MS


def test_engine_pauses_only_between_steps_that_wait_on_kv(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A step that ran no model, with nothing running or in flight but requests held
    (waiting for remote KV, or for their blocks to be read), is followed by a pause longer
    than the workers' spin; any other step is not."""
    from queue import Queue

    from vllm.v1.engine import core

    assert hasattr(core.EngineCoreProc, "_process_engine_step")  # the method wrapped
    pauses: list[float] = []

    def pause(inputs: Queue[str], seconds: float) -> None:
        assert isinstance(inputs, Queue)  # the engine's own input queue
        pauses.append(seconds)

    monkeypatch.setattr(vllm_patches, "pause_unless_input", pause)

    class Scheduler:
        def __init__(self, running: list[str], held: bool) -> None:
            self.running = running
            self.held = held

        def has_requests(self) -> bool:
            return self.held or bool(self.running)

    class EngineCoreProc:
        def __init__(self, executed: bool, running: list[str], queue: list[str] | None) -> None:
            self.executed = executed
            self.scheduler = Scheduler(running, held=True)
            self.batch_queue = queue
            self.input_queue: Queue[str] = Queue()

        def _process_engine_step(self) -> bool:
            return self.executed

    module = SimpleNamespace(EngineCoreProc=EngineCoreProc)
    vllm_patches._patch_idle_steps(module)  # type: ignore[arg-type]
    vllm_patches._patch_idle_steps(module)  # type: ignore[arg-type]
    assert EngineCoreProc(False, [], None)._process_engine_step() is False
    assert pauses == [vllm_patches.IDLE_STEP_PAUSE_S]
    assert vllm_patches.IDLE_STEP_PAUSE_S > vllm_patches.QUEUE_SPIN_S  # once only, too
    assert EngineCoreProc(False, [], [])._process_engine_step() is False
    assert len(pauses) == 2
    # A model step, a running request, a pipeline batch in flight: no pause.
    assert EngineCoreProc(True, [], None)._process_engine_step() is True
    EngineCoreProc(False, ["decoding"], None)._process_engine_step()
    EngineCoreProc(False, [], ["batch"])._process_engine_step()
    idle = EngineCoreProc(False, [], None)
    idle.scheduler.held = False
    idle._process_engine_step()
    assert len(pauses) == 2


def test_the_pause_ends_when_the_engine_gets_a_message() -> None:
    """A request or an abort that arrives during the pause is not held back."""
    import queue
    import time

    inputs: queue.Queue[str] = queue.Queue()
    timer = threading.Timer(0.05, inputs.put, args=("add request",))
    timer.start()
    started = time.monotonic()
    vllm_patches.pause_unless_input(inputs, 30.0)
    assert time.monotonic() - started < 10.0 and inputs.get_nowait() == "add request"
    inputs.put("abort")
    started = time.monotonic()
    vllm_patches.pause_unless_input(inputs, 30.0)  # already waiting: no pause at all
    assert time.monotonic() - started < 10.0
    started = time.monotonic()
    vllm_patches.pause_unless_input(queue.Queue(), 0.05)  # nothing arrives: the full pause
    assert time.monotonic() - started >= 0.05


def test_nixl_progress_thread_pauses_between_polls() -> None:
    """A real NIXL agent: its progress thread busy-polls unless paced."""
    import time

    from vllm.distributed import nixl_utils

    config = nixl_utils.nixl_agent_config
    api = sys.modules[config.__module__]
    native = api.nixlBind.nixlAgentConfig

    def idle_cpu_s(name: str) -> float:
        agent = api.nixl_agent(name, config(num_threads=1))
        started = time.process_time()
        time.sleep(1.0)
        used = time.process_time() - started
        del agent
        return used

    try:
        spinning = idle_cpu_s("pdserve-test-spinning")
        vllm_patches._patch_nixl_progress_thread(SimpleNamespace(nixl_agent_config=config))  # type: ignore[arg-type]
        paced_class = api.nixlBind.nixlAgentConfig
        vllm_patches._patch_nixl_progress_thread(SimpleNamespace(nixl_agent_config=config))  # type: ignore[arg-type]
        assert api.nixlBind.nixlAgentConfig is paced_class  # once only
        paced = paced_class()
        paced.pthrDelay = 0
        assert paced.pthrDelay == vllm_patches.NIXL_PROGRESS_DELAY_US
        quiet = idle_cpu_s("pdserve-test-paced")
    finally:
        api.nixlBind.nixlAgentConfig = native
    assert spinning > 0.1 and quiet < 0.25 * spinning, (spinning, quiet)
