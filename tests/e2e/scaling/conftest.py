"""One small 1 prefill + 1 decode cluster (tiny model) that the tests resize.

Cost on 2 cores: the cluster's start-up (two engines, about 85 s) plus one more decode
engine started under load (about 60 s) and its drain; about 3-4 minutes in all.
Ports: 21000-21999 (HTTP 21000, gRPC 21051, control 21052, workers 21100+, metrics
21200+, KV 21600+; below 32768: no ephemeral port can take one).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Cluster, Reference, run_cluster

BASE_PORT = 21000
CONTROL_PORT = BASE_PORT + 52  # run_cluster's --control-port
METRICS_BASE_PORT = BASE_PORT + 200


@pytest.fixture(scope="package")
def scalable_cluster(
    tiny_model: Path, reference: Reference, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    log_dir = tmp_path_factory.mktemp("cluster-scaling")
    # Round robin: the new decode worker must get requests even for prompts whose prefix
    # another worker has cached (this package tests scaling, not routing).
    extra = ["--prefill", "1", "--decode", "1", "--policy", "round_robin"]
    yield from run_cluster(tiny_model, log_dir, BASE_PORT, extra, 600)
