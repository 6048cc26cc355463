"""One 1 prefill + 1 decode cluster on the tiny model with ``--kv-transport grpc``.

Start-up cost: about 60-90 s on 2 cores (two eager engines starting together, as in the
NIXL cluster of tests/e2e/cluster). Ports 32000-32999. The KV lease is short (10 s) so
the lease test finishes quickly, and the KvTransfer fault-injection hook is enabled.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pdserve.kv_transfer.grpc_server import FAULT_INJECTION_ENV
from tests.e2e.conftest import Cluster, Reference, run_cluster

BASE_PORT = 32000
LEASE_S = 10.0
PREFILL_WORKER = f"127.0.0.1:{BASE_PORT + 100}"
DECODE_WORKER = f"127.0.0.1:{BASE_PORT + 101}"
PREFILL_KV = f"127.0.0.1:{BASE_PORT + 600}"  # the prefill worker's rank 0 (run_cluster's kv base)


@pytest.fixture(scope="package")
def grpc_cluster(
    tiny_model: Path, reference: Reference, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    # `reference` first: the plain vLLM engine answers and stops before the cluster starts.
    log_dir = tmp_path_factory.mktemp("cluster-grpc-kv")
    argv = ["--prefill", "1", "--decode", "1", "--kv-transport", "grpc"]
    argv += ["--kv-lease-s", str(LEASE_S)]
    # The fault-injection hook, for `pdserve up` and the workers it starts.
    yield from run_cluster(tiny_model, log_dir, BASE_PORT, argv, 600, {FAULT_INJECTION_ENV: "1"})
