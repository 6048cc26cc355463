"""Heterogeneous shapes over the grpc KV transport: prefill PP=2 -> decode TP=2.

Each prefill pipeline stage ships only its layers; each decode TP rank fetches only its
KV head, from both prefill stages. NIXL's pull mode cannot serve a PP prefill pool at all.
Like tests/e2e/topology, not part of the default `make test` (4 engine ranks on 2 cores
start in about 2 minutes); run with `make test-topology`. Ports 32300-32999.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Cluster, Reference, run_cluster


@pytest.fixture(scope="package")
def grpc_parallel_cluster(
    tiny_model: Path, reference: Reference, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    log_dir = tmp_path_factory.mktemp("cluster-grpc-pp2-tp2")
    shape = ["--prefill", "1", "--decode", "1", "--prefill-pp", "2", "--decode-tp", "2"]
    shape += ["--kv-transport", "grpc"]
    yield from run_cluster(tiny_model, log_dir, 32300, shape, 900)
