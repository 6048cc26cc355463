"""One real 1 prefill + 1 decode cluster (tiny model, NIXL) shared by this package."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Cluster, Reference, run_cluster


@pytest.fixture(scope="package")
def cluster(
    tiny_model: Path, reference: Reference, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    # `reference` first: the plain vLLM engine answers and stops before the cluster starts.
    log_dir = tmp_path_factory.mktemp("cluster-1p1d")
    yield from run_cluster(tiny_model, log_dir, 28000, ["--prefill", "1", "--decode", "1"], 600)
