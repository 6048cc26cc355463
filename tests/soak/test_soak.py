"""A bounded soak: steady concurrent traffic of valid, invalid and client-cancelled
requests against a real router process with toy workers, then checks that nothing
leaked and every request is accounted for.

- Every request ends as: completed correctly (the exact toy-model text), failed cleanly
  (a 4xx it was meant to get, or a 429), or cancelled by the client. Lost (a 5xx, a
  transport error, a timeout, wrong text) must be 0.
- The router's own requests counter agrees with the client's tally, by status class.
- Afterwards: the router's in-flight and queued gauges and every worker's running count
  are back to 0; the router's RSS grew by less than RSS_GROWTH_LIMIT_MB and its open file
  descriptors by less than FD_GROWTH_LIMIT since the warm-up.

Duration: PDSERVE_SOAK_S seconds (default 40: the `make test` run); `make test-soak`
runs it for 10 minutes. No timing assertions: the numbers are printed.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import psutil
import pytest

from tests.e2e.prompts import SERVED_NAME
from tests.soak.conftest import ToyCluster
from tests.unit.fake_lm import continuation, toy_text

pytestmark = pytest.mark.soak

SOAK_S = float(os.environ.get("PDSERVE_SOAK_S", "40"))
CONCURRENCY = 8
WARMUP_S = min(10.0, SOAK_S / 4)
REQUEST_TIMEOUT_S = 30.0
RSS_GROWTH_LIMIT_MB = 30.0
FD_GROWTH_LIMIT = 10
IN_FLIGHT_METRIC = "pdserve_router_requests_in_flight"
QUEUED_METRIC = "pdserve_router_requests_queued"
REQUESTS_METRIC = "pdserve_router_requests_total"

# Requests the router must refuse with a 4xx before touching a worker.
INVALID_BODIES: list[tuple[str, str | bytes]] = [
    ("negative max_tokens", json.dumps({"model": SERVED_NAME, "prompt": "a", "max_tokens": -5})),
    ("n = 10**9", json.dumps({"model": SERVED_NAME, "prompt": "a", "n": 10**9})),
    ("unknown model", json.dumps({"model": "nope", "prompt": "a"})),
    ("10k stop strings", json.dumps({"model": SERVED_NAME, "prompt": "a", "stop": ["x"] * 10_000})),
    ("huge prompt", json.dumps({"model": SERVED_NAME, "prompt": [7] * 5000})),
    ("bad JSON", b'{"model": "tiny-llama", "prompt": '),
    ("invalid UTF-8", b'{"model": "tiny-llama", "prompt": "\xff\xfe"}'),
    ("empty messages", json.dumps({"model": SERVED_NAME, "messages": []})),
]


@dataclass
class Tally:
    correct: Counter[str] = field(default_factory=Counter)
    failed_cleanly: Counter[str] = field(default_factory=Counter)
    cancelled: int = 0
    lost: list[str] = field(default_factory=list)

    @property
    def sent(self) -> int:
        done = sum(self.correct.values()) + sum(self.failed_cleanly.values())
        return done + self.cancelled + len(self.lost)


def _prompt(rng: random.Random) -> list[int]:
    # Ids the tiny tokenizer knows (vocabulary 382), so the router accepts them.
    return [rng.randrange(10, 380) for _ in range(rng.randrange(1, 40))]


def _expected(prompt: list[int], max_tokens: int) -> str:
    return "".join(toy_text(t) for t in continuation(prompt, max_tokens))


async def _complete(http: httpx.AsyncClient, rng: random.Random, tally: Tally) -> None:
    prompt, n = _prompt(rng), rng.randrange(1, 24)
    body = {"model": SERVED_NAME, "prompt": prompt, "max_tokens": n}
    reply = await http.post("/v1/completions", json=body)
    if reply.status_code == 429:
        tally.failed_cleanly["429"] += 1
    elif reply.status_code != 200:
        tally.lost.append(f"complete: {reply.status_code} {reply.text[:200]}")
    elif reply.json()["choices"][0]["text"] != _expected(prompt, n):
        tally.lost.append(f"complete: wrong text {reply.json()['choices'][0]['text']!r}")
    else:
        tally.correct["complete"] += 1


async def _stream(
    http: httpx.AsyncClient, rng: random.Random, tally: Tally, cancel_after: int | None
) -> None:
    """A streamed completion; with ``cancel_after``, hang up after that many events."""
    prompt = _prompt(rng)
    n = 200 if cancel_after is not None else rng.randrange(1, 40)
    body = {"model": SERVED_NAME, "prompt": prompt, "max_tokens": n, "stream": True}
    text, events = "", 0
    async with http.stream("POST", "/v1/completions", json=body) as reply:
        if reply.status_code == 429:
            tally.failed_cleanly["429"] += 1
            return
        if reply.status_code != 200:
            await reply.aread()
            tally.lost.append(f"stream: {reply.status_code} {reply.text[:200]}")
            return
        async for line in reply.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            events += 1
            text += json.loads(line[6:])["choices"][0]["text"]
            if cancel_after is not None and events >= cancel_after:
                tally.cancelled += 1
                return  # leaving the block closes the connection mid-stream
    if text == _expected(prompt, n):
        tally.correct["stream"] += 1
    else:
        tally.lost.append(f"stream: wrong text {text[:80]!r}")


async def _invalid(http: httpx.AsyncClient, rng: random.Random, tally: Tally) -> None:
    name, content = rng.choice(INVALID_BODIES)
    path = "/v1/chat/completions" if "messages" in name else "/v1/completions"
    raw = content if isinstance(content, bytes) else content.encode()
    reply = await http.post(path, content=raw, headers={"content-type": "application/json"})
    if 400 <= reply.status_code < 500:
        tally.failed_cleanly[name] += 1
    else:
        tally.lost.append(f"invalid {name}: {reply.status_code} {reply.text[:200]}")


async def _client(http: httpx.AsyncClient, seed: int, deadline: float, tally: Tally) -> None:
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        kind = rng.random()
        try:
            if kind < 0.35:
                await _complete(http, rng, tally)
            elif kind < 0.65:
                await _stream(http, rng, tally, cancel_after=None)
            elif kind < 0.8:
                await _stream(http, rng, tally, cancel_after=rng.randrange(1, 6))
            else:
                await _invalid(http, rng, tally)
        except (httpx.HTTPError, ValueError, KeyError) as e:
            tally.lost.append(f"{type(e).__name__}: {e}")


def _status_classes(cluster: ToyCluster) -> Counter[str]:
    text = httpx.get(f"{cluster.url}/metrics", timeout=10).text
    out: Counter[str] = Counter()
    for line in text.splitlines():
        if line.startswith(REQUESTS_METRIC + "{"):
            labels, value = line.rsplit(" ", 1)
            status = labels.split('status="', 1)[1].split('"', 1)[0]
            out[status[0] + "xx"] += int(float(value))
    return out


def _wait_idle(cluster: ToyCluster, timeout_s: float = 15.0) -> tuple[float, float, dict[str, int]]:
    deadline = time.monotonic() + timeout_s
    while True:
        state = (
            cluster.router_metric(IN_FLIGHT_METRIC),
            cluster.router_metric(QUEUED_METRIC),
            cluster.worker_running(),
        )
        if (state[0], state[1], sum(state[2].values())) == (0, 0, 0):
            return state
        if time.monotonic() > deadline:
            return state
        time.sleep(0.2)


async def test_soak_mixed_traffic_leaks_nothing(toy_cluster: ToyCluster) -> None:
    router = psutil.Process(toy_cluster.router.pid)
    before = _status_classes(toy_cluster)
    tally = Tally()
    limits = httpx.Limits(max_connections=CONCURRENCY * 2)
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S)
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=toy_cluster.url, limits=limits, timeout=timeout) as http:
        # Warm-up: the same traffic, so imports, caches and pools reach their steady size.
        warm_deadline = started + WARMUP_S
        await asyncio.gather(*(_client(http, i, warm_deadline, tally) for i in range(CONCURRENCY)))
        await asyncio.to_thread(_wait_idle, toy_cluster)
        rss0, fds0 = router.memory_info().rss, router.num_fds()
        deadline = started + SOAK_S
        seeds = range(100, 100 + CONCURRENCY)
        await asyncio.gather(*(_client(http, s, deadline, tally) for s in seeds))
    elapsed = time.monotonic() - started
    in_flight, queued, running = await asyncio.to_thread(_wait_idle, toy_cluster)
    rss1, fds1 = router.memory_info().rss, router.num_fds()
    after = _status_classes(toy_cluster)
    counted = after - before
    growth_mb = (rss1 - rss0) / 2**20
    print(
        f"\nsoak {elapsed:.0f} s at concurrency {CONCURRENCY}: sent {tally.sent} "
        f"({tally.sent / elapsed:.0f}/s), completed correctly {sum(tally.correct.values())} "
        f"{dict(tally.correct)}, failed cleanly {sum(tally.failed_cleanly.values())}, "
        f"cancelled {tally.cancelled}, lost {len(tally.lost)}; router counted {dict(counted)}; "
        f"router RSS {rss0 / 2**20:.1f} -> {rss1 / 2**20:.1f} MiB ({growth_mb:+.1f}), "
        f"fds {fds0} -> {fds1}"
    )
    assert tally.lost == [], tally.lost[:5]
    assert sum(tally.correct.values()) > 0 and tally.cancelled > 0
    assert sum(tally.failed_cleanly.values()) > 0
    # The router saw exactly the requests the clients sent, with the same outcomes
    # (a cancelled stream had its 200 before the hang-up).
    assert counted["2xx"] == sum(tally.correct.values()) + tally.cancelled
    assert counted["4xx"] == sum(tally.failed_cleanly.values())
    assert counted["5xx"] == 0
    assert (in_flight, queued, running) == (0, 0, {"prefill-0": 0, "decode-0": 0})
    assert growth_mb < RSS_GROWTH_LIMIT_MB
    assert fds1 - fds0 < FD_GROWTH_LIMIT
    toy_cluster.check_alive()
