"""Router latency histograms: admission queue time, and one end-to-end duration and one
TTFT per finished request (streamed or not)."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from pdserve.config import AdmissionConfig, AuthConfig
from pdserve.router.tokenize import PromptTokenizer
from tests.unit.test_admission_auth import body, start_router, tokenizer

__all__ = ["tokenizer"]  # the module-scoped fixture, shared with the admission tests

QUEUE_TIME = "pdserve_router_queue_time_seconds"


async def test_a_waiting_request_records_its_wait(tokenizer: PromptTokenizer) -> None:
    admission = AdmissionConfig(max_in_flight=1, max_queue=4, queue_timeout_s=10)
    async for r in start_router(tokenizer, admission, AuthConfig()):
        r.worker.token_delay_s = 0.1  # 6 tokens: about 0.6 s holding the only slot
        first = asyncio.create_task(r.http.post("/v1/completions", json=body(6)))
        await r.worker.started.wait()
        second = await r.http.post("/v1/completions", json=body(1))
        assert second.status_code == 200 and (await first).status_code == 200
        sample = r.metrics.registry.get_sample_value
        assert sample(QUEUE_TIME + "_count") == 2
        # The first was admitted at once; the second waited for the first to finish.
        assert sample(QUEUE_TIME + "_bucket", {"le": "0.01"}) == 1
        waited = sample(QUEUE_TIME + "_sum")
        assert waited is not None and 0.3 < waited < 5


def _total(registry: CollectorRegistry, name: str) -> float:
    """``name`` summed over all its label sets."""
    return sum(s.value for family in registry.collect() for s in family.samples if s.name == name)


async def test_every_finished_request_records_its_duration(tokenizer: PromptTokenizer) -> None:
    async for r in start_router(tokenizer, AdmissionConfig(), AuthConfig()):
        for stream in (False, True, False):
            resp = await r.http.post("/v1/completions", json=body(3, stream=stream))
            assert resp.status_code == 200
        registry = r.metrics.registry
        assert _total(registry, "pdserve_router_request_duration_seconds_count") == 3
        assert _total(registry, "pdserve_router_time_to_first_token_seconds_count") == 3
