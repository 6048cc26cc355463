"""One real 1 prefill + 2 decode cluster (tiny model, NIXL, kv_aware routing) for this
package. Start-up: three engines on two cores, about 2 minutes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.conftest import Cluster, run_cluster

BASE_PORT = 31000
# run_cluster's layout: worker slot i has its metrics on BASE_PORT + 200 + i.
DECODE_METRICS = {"decode-0": BASE_PORT + 201, "decode-1": BASE_PORT + 202}


@dataclass(frozen=True)
class RoutingCluster:
    cluster: Cluster
    decode_metrics: dict[str, int]


@pytest.fixture(scope="package")
def routing_cluster(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RoutingCluster]:
    log_dir = tmp_path_factory.mktemp("cluster-1p2d")
    extra = ["--prefill", "1", "--decode", "2", "--policy", "kv_aware"]
    extra += ["--control-port", str(BASE_PORT + 50)]
    for cluster in run_cluster(tiny_model, log_dir, BASE_PORT, extra, 900):
        yield RoutingCluster(cluster, DECODE_METRICS)
