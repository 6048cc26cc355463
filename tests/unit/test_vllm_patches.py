"""The NIXL pipeline-parallel consumer-count fix is narrow: counts stages, opt-in only."""

from __future__ import annotations

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

    original = utils.TransferTopology.dcp_consumer_count
    monkeypatch.setenv(vllm_patches.ENABLE_ENV, "1")
    monkeypatch.setattr(utils.TransferTopology, "dcp_consumer_count", original)
    vllm_patches.register()
    patched = utils.TransferTopology.dcp_consumer_count
    assert patched is not original and patched.__wrapped__ is original  # type: ignore[attr-defined]
    vllm_patches.register()
    assert utils.TransferTopology.dcp_consumer_count is patched
