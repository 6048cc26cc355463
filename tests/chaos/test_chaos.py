"""Faults injected into real processes; every request must complete with the exact greedy
tokens of an undisturbed run, or fail with one clear error -- never hang, never be lost.

The tests share one cluster and run in file order: later ones kill workers for good.
Each appends a row to the fault table printed at the end (conftest ``_report``).
"""

from __future__ import annotations

import dataclasses
import json
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import pytest

from tests.chaos.conftest import (
    BREAKER_COOLDOWN_S,
    BREAKER_FAILURES,
    CHECK_TIMEOUT_S,
    MAX_IN_FLIGHT,
    MAX_QUEUE,
    POLL_INTERVAL_S,
    ROUTER,
    TOY,
    ChaosCluster,
    FaultRow,
)
from tests.e2e.prompts import SERVED_NAME

pytestmark = pytest.mark.chaos

WORDS = [
    "distributed",
    "systems",
    "must",
    "tolerate",
    "partial",
    "failures",
    "and",
    "network",
    "partitions",
]
PROMPTS = [" ".join(WORDS[i:] + WORDS[:i]) + f" case {i}" for i in range(8)]
LONG_PROMPTS = [" ".join([p] * 12) for p in PROMPTS]  # ~400 tokens: a real prefill
MAX_TOKENS = 48
TIMEOUT_S = 180


@dataclass
class Result:
    status: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish: str | None = None
    error: str | None = None
    route: str = ""
    retry_after: str | None = None


def body(prompt: str, max_tokens: int, stream: bool) -> dict[str, object]:
    return {
        "model": SERVED_NAME,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
        "stream": stream,
    }


def complete(prompt: str, max_tokens: int = MAX_TOKENS) -> Result:
    r = httpx.post(
        f"{ROUTER}/v1/completions", json=body(prompt, max_tokens, False), timeout=TIMEOUT_S
    )
    if r.status_code != 200:
        return Result(r.status_code, error=r.text, retry_after=r.headers.get("retry-after"))
    choice = r.json()["choices"][0]
    route = r.headers.get("x-pdserve-route", "")
    return Result(200, choice["token_ids"], choice["text"], choice["finish_reason"], route=route)


def stream(
    prompt: str,
    max_tokens: int = MAX_TOKENS,
    on_token: Callable[[Result], None] | None = None,
    stop_after: int | None = None,
) -> Result:
    """Stream a completion; ``on_token`` runs after each chunk with tokens; with
    ``stop_after`` the client hangs up after that many chunks (a disconnect)."""
    payload = body(prompt, max_tokens, True)
    with httpx.stream("POST", f"{ROUTER}/v1/completions", json=payload, timeout=TIMEOUT_S) as r:
        result = Result(r.status_code, route=r.headers.get("x-pdserve-route", ""))
        if r.status_code != 200:
            r.read()
            result.error = r.text
            return result
        chunks = 0
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                result.error = event["error"]["message"]
                continue
            for choice in event["choices"]:
                result.token_ids += choice.get("token_ids") or []
                result.text += choice.get("text") or ""
                result.finish = choice.get("finish_reason") or result.finish
            chunks += 1
            if on_token is not None and result.token_ids:
                on_token(result)
            if stop_after is not None and chunks >= stop_after:
                return result
    return result


@pytest.fixture(scope="session")
def reference(chaos: ChaosCluster) -> dict[str, Result]:
    """Undisturbed answers, before any fault."""
    answers = {p: complete(p) for p in PROMPTS + LONG_PROMPTS}
    assert all(a.status == 200 and len(a.token_ids) == MAX_TOKENS for a in answers.values())
    return answers


def tally(
    chaos: ChaosCluster, fault: str, results: list[Result], reference: dict[str, Result],
    prompts: list[str], clean_statuses: tuple[int, ...] = (),
) -> FaultRow:  # fmt: skip
    correct = failed = 0
    for prompt, r in zip(prompts, results, strict=True):
        ref = reference[prompt]
        if r.status == 200 and r.error is None and r.token_ids == ref.token_ids:
            assert r.text == ref.text, (prompt, r.text, ref.text)
            correct += 1
        elif r.status in clean_statuses:
            failed += 1
        else:
            print(f"\nNOT CORRECT ({fault}): {r.status} {r.error} {len(r.token_ids)} tokens")
    row = FaultRow(fault, len(results), correct, failed)
    chaos.record(row)
    return row


def route_decode(route: str) -> str:
    return next(p.split("=", 1)[1] for p in route.split("; ") if p.startswith("decode="))


def test_overload_5x_gets_fast_429s(chaos: ChaosCluster, reference: dict[str, Result]) -> None:
    """40 long requests at once against 8 slots + 8 queue places: the ones beyond are
    refused at once with 429 + Retry-After, every admitted one completes correctly."""
    long = 6 * MAX_TOKENS  # long enough that the first admitted ones are still running
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(5 * MAX_IN_FLIGHT)]
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(lambda p: complete(p, long), prompts))
    # Greedy: the first MAX_TOKENS tokens are the reference's; the rest must be there.
    cut = [
        dataclasses.replace(r, token_ids=r.token_ids[:MAX_TOKENS], text=reference[p].text)
        if r.status == 200 and len(r.token_ids) == long
        else r
        for p, r in zip(prompts, results, strict=True)
    ]
    fault = f"overload 5x ({len(prompts)} at once, {MAX_IN_FLIGHT} slots + {MAX_QUEUE} queue)"
    row = tally(chaos, fault, cut, reference, prompts, (429,))
    refused = [r for r in results if r.status == 429]
    assert row.lost == 0
    assert refused and all(r.retry_after == "1" for r in refused)
    assert row.correct == len(prompts) - len(refused)
    assert chaos.router_metric("pdserve_router_rejected_requests_total") >= len(refused)


def test_client_disconnect_frees_engine_slots_and_kv(
    chaos: ChaosCluster, reference: dict[str, Result]
) -> None:
    if TOY:
        pytest.skip("toy workers have no engine metrics")
    workers = list(chaos.workers.values())
    baseline = [w.metric("vllm:kv_cache_usage_perc") for w in workers]
    with ThreadPoolExecutor(4) as pool:
        cut = list(pool.map(lambda p: stream(p, 400, stop_after=3), PROMPTS[:4]))
    assert all(r.status == 200 and r.token_ids for r in cut)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        running = [w.metric("vllm:num_requests_running") for w in workers]
        usage = [w.metric("vllm:kv_cache_usage_perc") for w in workers]
        if sum(running) == 0 and all(u <= b + 1e-9 for u, b in zip(usage, baseline, strict=True)):
            break
        time.sleep(0.5)
    assert sum(running) == 0, running
    assert usage == pytest.approx(baseline, abs=1e-9), (usage, baseline)
    after = [complete(p) for p in PROMPTS[:2]]  # and the cluster still serves
    row = tally(
        chaos, "client disconnect mid-stream (4), then 2 requests", after, reference, PROMPTS[:2]
    )
    chaos.record(FaultRow("  (the 4 disconnected streams: aborted by the client)", 4, 0, 4))
    assert row.lost == 0 and row.correct == 2


def test_sigstop_decode_opens_breaker_and_sigcont_closes_it(
    chaos: ChaosCluster, reference: dict[str, Result]
) -> None:
    victim = chaos.workers["decode-1"]
    # Each failed check costs its deadline plus the poll interval; add one interval for the
    # phase of the first poll, one for the gauge's sampling, and scheduling slack on 2
    # shared cores.
    bound = BREAKER_FAILURES * (CHECK_TIMEOUT_S + POLL_INTERVAL_S) + 2 * POLL_INTERVAL_S + 3.0
    victim.signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        with ThreadPoolExecutor(6) as pool:
            pending = [pool.submit(complete, p) for p in PROMPTS[:6]]
            opened_after = None
            while time.monotonic() - stopped_at < 10:
                if opened_after is None and chaos.breaker_state(victim) == 2:
                    opened_after = time.monotonic() - stopped_at
                time.sleep(0.2)
            results = [f.result() for f in pending]
    finally:
        victim.signal(signal.SIGCONT)
    continued_at = time.monotonic()
    row = tally(
        chaos, "SIGSTOP decode-1 for 10 s (6 requests during)", results, reference, PROMPTS[:6]
    )
    assert opened_after is not None and opened_after < bound, (opened_after, bound)
    closed_after = None
    while time.monotonic() - continued_at < BREAKER_COOLDOWN_S + 15:
        if chaos.breaker_state(victim) == 0 and chaos.healthy("decode") == 2:
            closed_after = time.monotonic() - continued_at
            break
        time.sleep(0.2)
    assert closed_after is not None
    print(f"\nbreaker: open {opened_after:.1f} s after SIGSTOP, closed {closed_after:.1f} s after")
    after = [complete(p) for p in PROMPTS[:6]]
    assert any(route_decode(r.route) == victim.name for r in after)  # back in rotation
    row2 = tally(chaos, "after SIGCONT (6 requests)", after, reference, PROMPTS[:6])
    assert row.lost == 0 and row.correct == 6 and row2.correct == 6


def test_sigterm_decode_under_load_drains(
    chaos: ChaosCluster, reference: dict[str, Result]
) -> None:
    victim = chaos.workers["decode-1"]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(16)]
    hit = threading.Event()
    results: list[Result] = []

    def on_token(r: Result) -> None:
        if route_decode(r.route) == victim.name:
            hit.set()

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(stream, p, MAX_TOKENS, on_token) for p in prompts]
        assert hit.wait(60), "no stream reached decode-1"
        victim.signal(signal.SIGTERM)
        terminated = time.monotonic()
        results = [f.result() for f in futures]
    assert victim.proc is not None
    code = victim.proc.wait(timeout=40)  # WorkerConfig.drain_timeout_s is 30 s
    exit_s = time.monotonic() - terminated
    row = tally(chaos, "SIGTERM decode-1 under load (16 streams)", results, reference, prompts)
    print(f"\ndecode-1 exited with {code} {exit_s:.1f} s after SIGTERM")
    assert row.lost == 0 and row.correct == len(prompts)
    assert code == 0
    chaos.restart("decode-1")  # back for the next tests (an engine start, ~1 min)
    chaos.wait_healthy({"prefill": 1, "decode": 2}, 300)


def test_sigkill_decode_mid_stream_and_before_first_token(
    chaos: ChaosCluster, reference: dict[str, Result]
) -> None:
    victim = chaos.workers["decode-0"]
    prompts = PROMPTS[:6]
    started: list[Result] = []
    lock = threading.Lock()
    on_victim = threading.Event()

    def on_token(r: Result) -> None:
        with lock:
            if r not in started:
                started.append(r)
            if route_decode(r.route) == victim.name and len(r.token_ids) >= 2:
                on_victim.set()

    with ThreadPoolExecutor(10) as pool:
        streams = [pool.submit(stream, p, MAX_TOKENS * 2, on_token) for p in prompts]
        assert on_victim.wait(60), "no stream reached decode-0"
        victim.signal(signal.SIGKILL)
        # The router has not noticed yet: these may be sent to the dead worker.
        fresh = [pool.submit(complete, p) for p in PROMPTS[:4]]
        results = [f.result() for f in streams]
        fresh_results = [f.result() for f in fresh]
    long_reference = {p: complete(p, MAX_TOKENS * 2) for p in prompts}  # on the survivors
    row = tally(chaos, "SIGKILL decode-0 mid-stream (6 streams)", results, long_reference, prompts)
    row2 = tally(
        chaos, "  requests sent right after the SIGKILL (4)", fresh_results, reference, PROMPTS[:4]
    )
    migrated = chaos.router_metric("pdserve_router_migrations_total", outcome="started")
    print(f"\nmigrations started: {migrated}")
    assert migrated >= 1
    assert row.lost == 0 and row.correct == len(prompts)
    assert row2.lost == 0 and row2.correct == 4
    for prompt in prompts:  # the long reference agrees with the short one where both exist
        assert long_reference[prompt].token_ids[:MAX_TOKENS] == reference[prompt].token_ids


def test_sigkill_prefill_with_requests_in_flight(
    chaos: ChaosCluster, reference: dict[str, Result]
) -> None:
    victim = chaos.workers["prefill-0"]
    prompts = LONG_PROMPTS * 2
    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(complete, p) for p in prompts]
        time.sleep(0.3)
        victim.signal(signal.SIGKILL)
        results = [f.result() for f in futures]
    row = tally(
        chaos, "SIGKILL prefill-0 with 16 long prompts in flight", results, reference, prompts
    )
    retried = chaos.router_metric("pdserve_router_retries_total")
    print(f"\nretries after the prefill kill (all so far): {retried}")
    assert row.lost == 0 and row.correct == len(prompts)
    again = [complete(p) for p in PROMPTS[:3]]  # colocated on the decode worker now
    assert tally(chaos, "  after: no prefill pool (3)", again, reference, PROMPTS[:3]).correct == 3
