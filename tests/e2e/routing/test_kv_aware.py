"""kv_aware routing on real engines: each group of requests sharing a long prefix goes to
the decode worker that holds the prefix, and that engine's own prefix-cache counter shows
the hit (not only the router's belief). The router's index is fed only by the engines'
KV events, so a non-zero cached_tokens in the route header also proves the router's
block hashes equal the engines'."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.e2e.prompts import SERVED_NAME
from tests.e2e.routing.conftest import RoutingCluster

pytestmark = pytest.mark.e2e

GROUPS = 4
PER_GROUP = 3
PREFIX_TOKENS = 320  # of a 512-token context
SUFFIX_TOKENS = 16


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")) and all(
            f'{k}="{v}"' in line for k, v in labels.items()
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _prefix_hits(port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return _metric(text, "vllm:prefix_cache_hits_total")


def _prompt(group: int, request: int) -> list[int]:
    # Token ids 3..372: inside the tiny model's vocabulary (382), past its special tokens.
    prefix = [3 + (group * 131 + k * 17) % 370 for k in range(PREFIX_TOKENS)]
    suffix = [3 + (request * 29 + group * 7 + k) % 370 for k in range(SUFFIX_TOKENS)]
    return prefix + suffix


def _route(header: str) -> dict[str, str]:
    parts = [p.strip() for p in header.split(";")]
    fields = dict(p.split("=", 1) for p in parts[1:])
    fields["mode"] = parts[0]
    return fields


def test_each_prefix_group_goes_to_the_worker_that_holds_it(
    routing_cluster: RoutingCluster,
) -> None:
    base = routing_cluster.cluster.http
    ports = routing_cluster.decode_metrics
    home: dict[int, str] = {}
    with httpx.Client(base_url=base, timeout=120) as client:
        # Interleaved groups: only a prefix index, not "the last worker", keeps them apart.
        for request in range(PER_GROUP):
            for group in range(GROUPS):
                before = {name: _prefix_hits(port) for name, port in ports.items()}
                r = client.post(
                    "/v1/completions",
                    json={
                        "model": SERVED_NAME,
                        "prompt": _prompt(group, request),
                        "max_tokens": 4,
                        "temperature": 0,
                    },
                )
                assert r.status_code == 200, r.text
                route = _route(r.headers["x-pdserve-route"])
                after = {name: _prefix_hits(port) for name, port in ports.items()}
                gained = {name: after[name] - before[name] for name in ports}
                decode = route["decode"]
                if request == 0:
                    home[group] = decode
                    assert int(route["cached_tokens"]) == 0, route
                else:
                    cached = int(route["cached_tokens"])
                    assert decode == home[group], (group, route, home)
                    # The router's belief: the whole shared prefix (block-aligned).
                    assert PREFIX_TOKENS - 128 < cached <= PREFIX_TOKENS, route
                    # The engine's own counter: it reused at least what the router expected;
                    # the other decode engine reused nothing for this request.
                    assert gained[decode] >= cached, (route, gained)
                    assert all(v == 0 for name, v in gained.items() if name != decode), gained
                # Let the engines' KV events reach the router before the next request.
                time.sleep(0.3)
    router = httpx.get(f"{base}/metrics", timeout=10).text
    assert _metric(router, "pdserve_router_kv_event_hash_mismatches_total") == 0
    assert _metric(router, "pdserve_router_kv_index_blocks", mode="events") > 0
    hits = _metric(
        router, "pdserve_router_prefix_cache_requests_total", pool="decode", result="hit"
    )
    assert hits == GROUPS * (PER_GROUP - 1)
