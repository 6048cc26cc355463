"""Heterogeneous shapes over the grpc KV transport, both ways round:

- prefill PP=2 -> decode TP=2: each prefill pipeline stage ships only its layers; each
  decode TP rank fetches only its KV head, from both prefill stages (NIXL's pull mode
  cannot serve a PP prefill pool at all);
- prefill TP=2 -> decode PP=2: each decode stage fetches only its layers, from both
  prefill TP ranks (each holds half of the KV heads), so heads merge and layers split.

One cluster at a time (the fixture is parametrized: pytest stops one shape before it
starts the next); 4 engine ranks on 2 cores start in about 2 minutes each.
Ports 23000-23999 and 26000-26999 (below the ephemeral range).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Cluster, Reference, run_cluster

# (label, pool flags, base port)
SHAPES = [
    ("pp2-tp2", ["--prefill-pp", "2", "--decode-tp", "2"], 23000),
    ("tp2-pp2", ["--prefill-tp", "2", "--decode-pp", "2"], 26000),
]


@pytest.fixture(scope="package", params=SHAPES, ids=[label for label, _, _ in SHAPES])
def grpc_parallel_cluster(
    request: pytest.FixtureRequest,
    tiny_model: Path,
    reference: Reference,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Cluster]:
    label, pools, base_port = request.param
    log_dir = tmp_path_factory.mktemp(f"cluster-grpc-{label}")
    shape = ["--prefill", "1", "--decode", "1", *pools, "--kv-transport", "grpc"]
    yield from run_cluster(tiny_model, log_dir, base_port, shape, 900)
