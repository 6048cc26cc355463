"""A real 1 prefill + 1 decode cluster (tiny model, NIXL) with tracing on: the router and
both workers export over OTLP to a receiver in this test process."""

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
    log_dir = tmp_path_factory.mktemp("cluster-tracing")
    pools = ["--prefill", "1", "--decode", "1"]
    yield from run_cluster(tiny_model, log_dir, 30000, pools, 600, otlp_receiver.environment(otlp))
