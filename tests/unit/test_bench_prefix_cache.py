"""Prefix-cache hit rate of benchmark phases: counter parsing, deltas, the ideal, and the
whole chain (runner -> engine /metrics before and after a phase -> report) against a fake
engine that caches full blocks of the prompt's token ids the way vLLM does."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from pdserve.bench.arrival import ArrivalSpec
from pdserve.bench.client import ClientOptions, RequestResult
from pdserve.bench.metrics import compute_metrics
from pdserve.bench.prefix_cache import (
    CacheCounters,
    CacheHistory,
    EngineEndpoint,
    EngineRole,
    PrefixCacheProbe,
    PrefixCacheStats,
    ideal_hit_rate,
    parse_counters,
    phase_stats,
)
from pdserve.bench.report import BenchReport, markdown
from pdserve.bench.runner import PhaseResult, RunPlan, TargetResult, run_target
from pdserve.bench.workloads import (
    BenchRequest,
    Tokenizer,
    Workload,
    WorkloadKind,
    WorkloadSpec,
    build_workload,
    load_tokenizer,
)
from pdserve.metrics import WithRole

BLOCK = 16

EXPOSITION = """\
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1000.0
vllm:prefix_cache_queries_total{engine="1",model_name="m"} 500.0
vllm:prefix_cache_queries_created{engine="0",model_name="m"} 1.7e9
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 256.0
vllm:prefix_cache_hits_total{engine="1",model_name="m"} 128.0
vllm:external_prefix_cache_hits_total{engine="0",model_name="m"} 9999.0
vllm:cache_config_info{block_size="128",cache_dtype="auto",engine="0"} 1.0
"""


def test_parse_counters_sums_series_and_reads_the_block_size() -> None:
    counters = parse_counters(EXPOSITION)
    assert counters == CacheCounters(queries=1500.0, hits=384.0, block_size=128)
    assert parse_counters("") == CacheCounters(0.0, 0.0, None)


def test_parse_counters_reads_what_prometheus_client_writes_through_a_worker() -> None:
    # vLLM's stat logger: counters and an info gauge in prometheus_client's default
    # format; a pdserve worker serves them with a role label added (WithRole).
    registry = CollectorRegistry()
    labels = ["model_name", "engine"]
    queries = Counter("vllm:prefix_cache_queries", "q", labels, registry=registry)
    hits = Counter("vllm:prefix_cache_hits", "h", labels, registry=registry)
    info = Gauge("vllm:cache_config_info", "i", ["block_size", "engine"], registry=registry)
    for engine, (q, h) in enumerate(((640, 512), (100, 0))):
        queries.labels("m", str(engine)).inc(q)
        hits.labels("m", str(engine)).inc(h)
    info.labels("128", "0").set(1)
    text = generate_latest(WithRole(registry, "decode")).decode()
    assert 'role="decode"' in text
    assert parse_counters(text) == CacheCounters(740.0, 512.0, 128)


def test_phase_stats_counts_serving_engines_and_keeps_prefill_apart() -> None:
    engines = [
        EngineEndpoint("prefill-0", "u0", EngineRole.PREFILL),
        EngineEndpoint("decode-0", "u1"),
        EngineEndpoint("decode-1", "u2"),
    ]
    before = {
        "prefill-0": CacheCounters(100, 0),
        "decode-0": CacheCounters(50, 10),
        "decode-1": CacheCounters(0, 0),
    }
    after = {
        "prefill-0": CacheCounters(1100, 500),
        "decode-0": CacheCounters(650, 310),
        "decode-1": CacheCounters(400, 100),
    }
    stats = phase_stats(engines, before, after, ideal_hit_rate=0.5, block_size=16)
    assert (stats.queries, stats.hits) == (1000, 400)
    assert stats.hit_rate == pytest.approx(0.4)
    assert stats.prefill_hit_rate == pytest.approx(0.5)
    assert stats.vs_ideal == pytest.approx(0.8)
    assert [(e.name, e.queries, e.hits) for e in stats.engines] == [
        ("prefill-0", 1000, 500),
        ("decode-0", 600, 300),
        ("decode-1", 400, 100),
    ]
    idle = phase_stats(engines[1:], before, before)
    assert idle.hit_rate is None and idle.prefill_hit_rate is None and idle.vs_ideal is None


def _result(rid: str, start: float, prompt: int, server: int | None = None, ok: bool = True):
    return RequestResult(rid, ok, start, 1.0, 0.1, [], prompt, 4, 4, server_prompt_tokens=server)


def _shared(groups: list[int], prefix_len: int, question: int) -> Workload:
    chains = tuple(
        (BenchRequest(f"r{i}", "x", prefix_len + question, 4, group=g),)
        for i, g in enumerate(groups)
    )
    return Workload("shared-prefix", chains, {"prefix_len": prefix_len})


def test_ideal_hit_rate_first_request_of_each_group_misses() -> None:
    # Prefix 300 tokens, question 20: prompts of 320; 128-token blocks reuse 256 of 300.
    workload = _shared([0, 1, 0, 1, 0, 0], 300, 20)
    results = [_result(f"r{i}", float(i), 320) for i in range(6)]
    history = CacheHistory()
    assert ideal_hit_rate(workload, results, 128, history) == pytest.approx(4 * 256 / (6 * 320))
    assert history.groups == {0, 1} and len(history.requests) == 6
    # A later phase repeats the prompts: each is reused whole but its last token,
    # 319 tokens of 320, in whole blocks 256 (and with 16-token blocks 304).
    assert ideal_hit_rate(workload, results, 128, history) == pytest.approx(256 / 320)
    assert ideal_hit_rate(workload, results, 16, history) == pytest.approx(304 / 320)
    # Other prompts of groups an earlier phase sent: their prefix only, no first misses.
    for size, reused in ((128, 256), (16, 288)):
        history.requests.clear()
        assert ideal_hit_rate(workload, results, size, history) == pytest.approx(reused / 320)
    # Block size 1: the whole prefix is reusable.
    assert ideal_hit_rate(workload, results, 1) == pytest.approx(4 * 300 / (6 * 320))


def test_ideal_hit_rate_uses_send_order_server_counts_and_only_ok_requests() -> None:
    workload = _shared([0, 0, 0], 255, 10)
    # Sent in the order r2, r0, r1: r2 is the group's first. The server adds one token
    # in front (a BOS), so the shared prefix is 256 tokens: two whole 128-token blocks.
    results = [
        _result("r0", 2.0, 265, server=266),
        _result("r1", 3.0, 265, server=266, ok=False),
        _result("r2", 1.0, 265, server=266),
    ]
    assert ideal_hit_rate(workload, results, 128) == pytest.approx(256 / (2 * 266))
    # Without the BOS, 255 tokens hold one whole block only.
    plain = [_result("r0", 2.0, 265), _result("r2", 1.0, 265)]
    assert ideal_hit_rate(workload, plain, 128) == pytest.approx(128 / (2 * 265))


def test_ideal_hit_rate_never_counts_the_prompt_s_last_token() -> None:
    # A prompt that is exactly the prefix: vLLM recomputes its last token, so of a
    # 256-token prompt at most 255 tokens, one whole 128-block less, are reusable.
    workload = _shared([0, 0], 256, 0)
    results = [_result("r0", 0.0, 256), _result("r1", 1.0, 256)]
    assert ideal_hit_rate(workload, results, 128) == pytest.approx(128 / 512)


def test_ideal_hit_rate_is_undefined_for_other_workloads() -> None:
    workload = Workload("random", ((BenchRequest("r0", "x", 10, 4),),), {})
    assert ideal_hit_rate(workload, [_result("r0", 0.0, 10)], 16) is None


class FakeEngine:
    """A vLLM-like OpenAI server: streams completions and counts prefix-cache queries and
    hits over full blocks of the prompt's token ids (never the last token), as its own
    ``/metrics``. ``bos`` prepends a token, as tokenizers with a BOS do."""

    def __init__(self, tokenizer: Tokenizer, caching: bool = True, bos: bool = True) -> None:
        self.tokenizer = tokenizer
        self.caching = caching
        self.bos = bos
        self.blocks: set[tuple[int, ...]] = set()
        self.queries = 0
        self.hits = 0
        self.lock = threading.Lock()
        engine = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if self.path == "/metrics":
                    self._send(200, "text/plain", engine.exposition().encode())
                elif self.path == "/v1/models":
                    self._send(200, "application/json", b'{"data": [{"id": "m"}]}')
                else:
                    self._send(404, "text/plain", b"")

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                prompt = engine.admit(body["prompt"])
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("connection", "close")
                self.end_headers()
                n = int(body["max_tokens"])
                for i in range(n):
                    finish = "length" if i == n - 1 else None
                    choice = {"index": 0, "text": f" t{i}", "finish_reason": finish}
                    self._event({"choices": [choice]})
                self._event({"choices": [], "usage": {"prompt_tokens": prompt}})
                self.wfile.write(b"data: [DONE]\n\n")

            def _event(self, obj: object) -> None:
                self.wfile.write(f"data: {json.dumps(obj)}\n\n".encode())

            def _send(self, status: int, kind: str, data: bytes) -> None:
                self.send_response(status)
                self.send_header("content-type", kind)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def admit(self, prompt: str) -> int:
        ids = ([1] if self.bos else []) + self.tokenizer.encode(prompt, add_special_tokens=False)
        with self.lock:
            self.queries += len(ids)
            full = (len(ids) - 1) // BLOCK
            chain = [tuple(ids[: (b + 1) * BLOCK]) for b in range(full)]
            hit = 0
            for key in chain:
                if key not in self.blocks:
                    break
                hit += 1
            self.hits += hit * BLOCK
            if self.caching:
                self.blocks.update(chain)
        return len(ids)

    def exposition(self) -> str:
        with self.lock:
            return (
                f'vllm:prefix_cache_queries_total{{engine="0"}} {self.queries}.0\n'
                f'vllm:prefix_cache_hits_total{{engine="0"}} {self.hits}.0\n'
                f'vllm:cache_config_info{{block_size="{BLOCK}",engine="0"}} 1.0\n'
            )

    def __enter__(self) -> FakeEngine:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_tokenizer("tiny")


@pytest.fixture
def engine(tokenizer: Tokenizer) -> Iterator[FakeEngine]:
    with FakeEngine(tokenizer) as fake:
        yield fake


def _plan(tokenizer: Tokenizer, phases: int = 2) -> RunPlan:
    spec = WorkloadSpec(
        kind=WorkloadKind.SHARED_PREFIX,
        num_requests=9,
        groups=3,
        prefix_len=70,
        input_len="5-20",
        output_len="3",
        seed=3,
    )
    return RunPlan(
        workload=build_workload(spec, tokenizer),
        phases=[ArrivalSpec(concurrency=1)] * phases,
        client=ClientOptions(model="m"),
    )


def _target(fake: FakeEngine, metrics_url: str | None = None) -> TargetResult:
    url = metrics_url or fake.url + "/metrics"
    return TargetResult("t", fake.url, "m", engines=[EngineEndpoint("e", url)])


def test_a_perfect_cache_measures_its_ideal_phase_after_phase(
    engine: FakeEngine, tokenizer: Tokenizer
) -> None:
    engine.admit("unrelated warm traffic before the run")
    target = asyncio.run(run_target(_target(engine), _plan(tokenizer)))
    first, second = (p.metrics.prefix_cache for p in target.phases)
    assert first is not None and second is not None
    assert first.block_size == BLOCK and first.error is None
    # 9 requests, one served prompt each; BOS + 70-token prefix = 4 whole 16-token blocks.
    prompts = sum(r.server_prompt_tokens or 0 for r in target.phases[0].results)
    assert first.queries == prompts == first.prompt_tokens
    assert first.hits == 6 * 4 * BLOCK  # the first request of each of the 3 groups misses
    assert first.ideal_hit_rate == pytest.approx(6 * 64 / prompts)
    assert first.hit_rate == pytest.approx(first.ideal_hit_rate)
    # The second phase repeats the workload: every prompt is reused but its last token.
    whole = sum((n - 1) // BLOCK * BLOCK for r in target.phases[1].results
                if (n := r.server_prompt_tokens))  # fmt: skip
    assert second.ideal_hit_rate == pytest.approx(whole / prompts)
    assert second.hit_rate == pytest.approx(second.ideal_hit_rate)
    assert second.vs_ideal == pytest.approx(1.0)
    data = target.to_json()["phases"][0]["metrics"]["prefix_cache"]
    assert data["hit_rate"] == pytest.approx(first.hit_rate)
    assert data["engines"] == [
        {"name": "e", "role": "serving", "queries": first.queries, "hits": first.hits}
    ]


def test_an_engine_without_caching_measures_zero_against_its_ideal(
    tokenizer: Tokenizer,
) -> None:
    with FakeEngine(tokenizer, caching=False, bos=False) as fake:
        target = asyncio.run(run_target(_target(fake), _plan(tokenizer, phases=1)))
    (phase,) = target.phases
    stats = phase.metrics.prefix_cache
    assert stats is not None and stats.hit_rate == 0.0
    # Without a BOS, the 70-token prefix holds 4 whole blocks of 16 as well.
    assert stats.ideal_hit_rate is not None and stats.ideal_hit_rate > 0.3
    assert stats.vs_ideal == 0.0


def test_an_unreachable_engine_is_recorded_not_fatal(
    engine: FakeEngine, tokenizer: Tokenizer
) -> None:
    target = _target(engine, metrics_url="http://127.0.0.1:9/metrics")
    asyncio.run(run_target(target, _plan(tokenizer, phases=1)))
    (phase,) = target.phases
    stats = phase.metrics.prefix_cache
    assert stats is not None and stats.hit_rate is None
    assert stats.error is not None and "before the phase" in stats.error
    assert phase.metrics.completed == 9  # the phase itself ran
    assert stats.ideal_hit_rate is not None and stats.block_size == 128  # the default


def test_probe_takes_a_given_block_size_over_the_engines(
    engine: FakeEngine, tokenizer: Tokenizer
) -> None:
    plan = _plan(tokenizer, phases=1)
    probe = PrefixCacheProbe([EngineEndpoint("e", engine.url + "/metrics")], block_size=32)

    async def go() -> PrefixCacheStats:
        await probe.begin()
        return await probe.end(plan.workload, [])

    stats = asyncio.run(go())
    assert stats.block_size == 32 and stats.queries == 0 and stats.hit_rate is None


def _phase(name: str, stats: PrefixCacheStats | None) -> TargetResult:
    results = [_result("r0", 0.0, 100)]
    metrics = compute_metrics(results)
    if stats is not None:
        from dataclasses import replace

        metrics = replace(metrics, prefix_cache=stats)
    target = TargetResult(name, "http://x", "m")
    target.phases.append(PhaseResult(ArrivalSpec(concurrency=1), metrics, results))
    return target


def test_report_shows_the_hit_rate_against_the_ideal() -> None:
    measured = PrefixCacheStats(
        hit_rate=0.72, queries=1000, hits=720, prefill_hit_rate=0.25, ideal_hit_rate=0.8,
        block_size=128, prompt_tokens=990,
    )  # fmt: skip
    report = BenchReport(
        workload={"name": "shared-prefix"},
        targets=[_phase("kv", measured), _phase("attached", None)],
        environment={},
    )
    text = markdown(report)
    assert "| kv | 72.0% | 80.0% | 0.90 | 720/1000 | 990 | 25.0% | 128 |" in text
    assert "| attached | - | - | - | - | - | - | - |" in text
    assert "TTFT p90 ms" in text
    plain = markdown(BenchReport({"name": "random"}, [_phase("a", None)], {}))
    assert "Prefix cache" not in plain
