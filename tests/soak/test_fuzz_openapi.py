"""Schemathesis against the router's own OpenAPI schema, over real HTTP, with toy workers
behind it: generated valid and invalid requests for every operation must get no 5xx and
an answer within a deadline (no hung request), and the router must serve afterwards.

Bounded: a few dozen examples per operation (FUZZ_EXAMPLES), well under a minute.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from tests.e2e.prompts import SERVED_NAME
from tests.soak.conftest import ToyCluster

pytestmark = pytest.mark.soak

FUZZ_EXAMPLES = int(os.environ.get("PDSERVE_FUZZ_EXAMPLES", "25"))
# A toy-worker request finishes in well under a second; anything near this is a hang.
REQUEST_TIMEOUT_S = 15.0
MAX_TOKENS = 16


def _operations(cluster: ToyCluster) -> list[Any]:
    """Every client-facing operation of the router's schema (not /debug)."""
    loaded = schemathesis.openapi.from_url(f"{cluster.url}/openapi.json")
    operations = [result.ok() for result in loaded.get_all_operations()]
    return [op for op in operations if not op.path.startswith("/debug/")]


def _reach_the_workers(case: Any) -> None:
    """Valid requests name the served model (else all are 404 before any worker is
    touched) and ask for at most MAX_TOKENS tokens (bounded run time)."""
    if isinstance(case.body, dict):
        case.body["model"] = SERVED_NAME
        for field in ("max_tokens", "max_completion_tokens"):
            if isinstance(case.body.get(field), int) and case.body[field] > MAX_TOKENS:
                case.body[field] = MAX_TOKENS


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_router_openapi_no_5xx_no_hang(toy_cluster: ToyCluster, mode: GenerationMode) -> None:
    """Schema-valid (positive) and schema-violating (negative) requests, per operation."""
    operations = _operations(toy_cluster)
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= {
        op.path for op in operations
    }
    calls: Counter[int] = Counter()
    fuzzed: Counter[str] = Counter()
    slowest = [0.0]
    for operation in operations:

        @settings(
            max_examples=FUZZ_EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def fuzz(case: Any) -> None:
            if mode is GenerationMode.POSITIVE:
                _reach_the_workers(case)
            started = time.monotonic()
            response = case.call(base_url=toy_cluster.url, timeout=REQUEST_TIMEOUT_S)
            slowest[0] = max(slowest[0], time.monotonic() - started)
            calls[response.status_code] += 1
            fuzzed[case.operation.path] += 1
            case.validate_response(response, checks=[not_a_server_error])

        try:
            fuzz()
        except Unsatisfiable:
            # Negative mode: an operation without parameters or body has nothing to break.
            assert mode is GenerationMode.NEGATIVE, operation.path
    print(
        f"\n{mode.value}: status codes {dict(sorted(calls.items()))}, per path {dict(fuzzed)}, "
        f"slowest answer {slowest[0]:.2f} s"
    )
    # The requests were really sent, and the generation endpoints got many of them.
    assert fuzzed["/v1/completions"] >= FUZZ_EXAMPLES // 2
    assert fuzzed["/v1/chat/completions"] >= FUZZ_EXAMPLES // 2
    if mode is GenerationMode.POSITIVE:
        assert calls[200] >= 4  # some generated requests went all the way to the workers
    toy_cluster.check_alive()


def test_router_still_serves_after_fuzzing(toy_cluster: ToyCluster) -> None:
    toy_cluster.check_alive()
    body = {"model": SERVED_NAME, "prompt": [5, 6, 7], "max_tokens": 3}
    reply = httpx.post(f"{toy_cluster.url}/v1/completions", json=body, timeout=30)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["text"] == " t8 t9 t10"
