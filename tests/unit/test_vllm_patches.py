"""pdserve's vLLM fixes are narrow: opt-in only, each applied once, at the right time."""

from __future__ import annotations

import importlib
import sys
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
    monkeypatch.setattr(utils.TransferTopology, "dcp_consumer_count", original)
    vllm_patches.register()
    patched = utils.TransferTopology.dcp_consumer_count
    assert patched is not original and patched.__wrapped__ is original  # type: ignore[attr-defined]
    vllm_patches.register()
    assert utils.TransferTopology.dcp_consumer_count is patched
    # The model-runner fix waits for the (heavy) model runner's own import.
    assert deferred == ["vllm.v1.worker.gpu_model_runner"] * 2


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
