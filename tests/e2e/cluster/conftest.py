"""One real 1 prefill + 1 decode cluster (tiny model, NIXL) shared by this package.

Tracing is on (OTLP to a receiver in the test process): test_tracing.py checks the
traces, and every other test here runs with it on.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e import otlp_receiver
from tests.e2e.conftest import Cluster, Reference, run_cluster
from tests.e2e.otlp_receiver import OtlpReceiver

OTLP_PORT = 30317


@pytest.fixture(scope="package")
def otlp() -> Iterator[OtlpReceiver]:
    yield from otlp_receiver.started(OTLP_PORT)


@pytest.fixture(scope="package")
def cluster(
    tiny_model: Path,
    reference: Reference,
    otlp: OtlpReceiver,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Cluster]:
    # `reference` first: the plain vLLM engine answers and stops before the cluster starts.
    log_dir = tmp_path_factory.mktemp("cluster-1p1d")
    pools = ["--prefill", "1", "--decode", "1"]
    env = otlp_receiver.environment(otlp)
    yield from run_cluster(tiny_model, log_dir, 28000, pools, 600, env)
