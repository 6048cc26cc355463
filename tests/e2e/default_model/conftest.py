"""The default model (SmolLM2-135M-Instruct, what `make up` serves) through a 1P+1D
cluster with the grpc KV transport, against one plain vLLM engine on the same model.

The reference runs first and stops before the cluster starts, so they never share the
cores. About 2 minutes in all. Ports 27000-27999.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from pdserve.models import DEFAULT_MODEL, resolve_model
from tests.e2e.conftest import Answer, Cluster, completion_answer, plain_vllm, run_cluster
from tests.e2e.prompts import COMPLETION_CASES

SERVED = "smollm2"
BASE_PORT = 27000
REFERENCE_PORT = BASE_PORT + 900
# Short, a few KV blocks, and long (300 words: well inside the context in this tokenizer).
CASES = [COMPLETION_CASES[i] for i in (0, 4, 8, 12, 15, 17)]


@dataclass(frozen=True)
class DefaultModelRun:
    cluster: Cluster
    reference: list[Answer]


@pytest.fixture(scope="package")
def default_model_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DefaultModelRun]:
    model = resolve_model(DEFAULT_MODEL)
    log_dir = tmp_path_factory.mktemp("default-model")
    with plain_vllm(model, SERVED, REFERENCE_PORT, log_dir / "reference.log") as client:
        reference = [completion_answer(client, p, n, model=SERVED) for p, n in CASES]
    extra = ["--served-model-name", SERVED, "--kv-transport", "grpc"]
    for cluster in run_cluster(model, log_dir / "cluster", BASE_PORT, extra, 900):
        yield DefaultModelRun(cluster, reference)
