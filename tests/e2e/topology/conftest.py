"""A second real cluster with parallel engines: prefill TP=2, decode PP=2 (tiny model)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Cluster, Reference, run_cluster


@pytest.fixture(scope="package")
def parallel_cluster(
    tiny_model: Path, reference: Reference, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    log_dir = tmp_path_factory.mktemp("cluster-tp2-pp2")
    shape = ["--prefill", "1", "--decode", "1", "--prefill-tp", "2", "--decode-pp", "2"]
    # Eager engines (kv_transfer/vllm_patches.py makes PP work without torch.compile).
    yield from run_cluster(tiny_model, log_dir, 29000, shape, 600)
