"""Every Prometheus metric pdserve exports: names, help, labels and buckets in one place.

Dashboards, alert rules and tests refer to these names; change them here only.
Metric objects are created per process on a registry that is passed in (no globals).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

# Latency buckets for LLM serving: TTFT spans milliseconds (cache hits) to tens of seconds
# (long prompts on CPUs); ITL spans a few milliseconds to about a second.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5, 10, 20, 40, 80)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
# Admission waits: none at all (most requests) up to the queue timeout.
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Scheduling plugins run in microseconds; KV events arrive within milliseconds.
SCHEDULING_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.05)
EVENT_LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

ROUTER_REQUESTS = "pdserve_router_requests_total"
ROUTER_IN_FLIGHT = "pdserve_router_requests_in_flight"
ROUTER_TTFT = "pdserve_router_time_to_first_token_seconds"
ROUTER_ITL = "pdserve_router_inter_token_latency_seconds"
ROUTER_E2E = "pdserve_router_request_duration_seconds"
ROUTER_ROUTING = "pdserve_router_routing_decisions_total"
ROUTER_WORKERS_HEALTHY = "pdserve_router_workers_healthy"
ROUTER_PROMPT_TOKENS = "pdserve_router_prompt_tokens_total"
ROUTER_GENERATION_TOKENS = "pdserve_router_generation_tokens_total"
ROUTER_QUEUE_TIME = "pdserve_router_queue_time_seconds"
ROUTER_BREAKER_STATE = "pdserve_router_worker_circuit_state"
ROUTER_RETRIES = "pdserve_router_retries_total"
ROUTER_MIGRATIONS = "pdserve_router_migrations_total"
ROUTER_REJECTED = "pdserve_router_rejected_requests_total"
ROUTER_QUEUED = "pdserve_router_requests_queued"
# Context-aware routing (router/scheduling, router/kv_index, router/planner).
ROUTER_SCHEDULING_DECISIONS = "pdserve_router_scheduling_decisions_total"
ROUTER_SCHEDULING_PLUGIN_SECONDS = "pdserve_router_scheduling_plugin_seconds"
ROUTER_PREFIX_TOKENS = "pdserve_router_prefix_cache_tokens_total"
ROUTER_PREFIX_REQUESTS = "pdserve_router_prefix_cache_requests_total"
ROUTER_DISAGGREGATION = "pdserve_router_disaggregation_decisions_total"
ROUTER_KV_INDEX_BLOCKS = "pdserve_router_kv_index_blocks"
ROUTER_KV_EVENT_LAG = "pdserve_router_kv_event_lag_seconds"
ROUTER_KV_EVENT_RESYNCS = "pdserve_router_kv_event_resyncs_total"
ROUTER_KV_HASH_MISMATCHES = "pdserve_router_kv_event_hash_mismatches_total"

WORKER_REQUESTS = "pdserve_worker_requests_total"
WORKER_IN_FLIGHT = "pdserve_worker_requests_in_flight"
WORKER_TTFT = "pdserve_worker_time_to_first_token_seconds"
WORKER_E2E = "pdserve_worker_request_duration_seconds"
WORKER_KV_HANDLES = "pdserve_worker_kv_handles_total"
WORKER_KV_INCOMPATIBLE = "pdserve_worker_kv_incompatible_total"
WORKER_KV_TRANSFER_BYTES = "pdserve_worker_kv_transfer_bytes_total"
# The grpc KV transport (kv_transfer/): counted in the engine ranks, exported by the worker.
KV_TRANSFER_BYTES_SENT = "pdserve_kv_transfer_bytes_sent_total"
KV_TRANSFER_BYTES_RECEIVED = "pdserve_kv_transfer_bytes_received_total"
KV_TRANSFER_SHM_BYTES_RECEIVED = "pdserve_kv_transfer_shm_bytes_received_total"
KV_TRANSFER_DURATION = "pdserve_kv_transfer_duration_seconds"
KV_TRANSFER_FAILURES = "pdserve_kv_transfer_failures_total"
KV_TRANSFER_STAGED_BLOCKS = "pdserve_kv_transfer_staged_blocks"
KV_TRANSFER_STAGED_REQUESTS = "pdserve_kv_transfer_staged_requests"
KV_TRANSFER_LEASE_EXPIRATIONS = "pdserve_kv_transfer_lease_expirations_total"
KV_TRANSFER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Families:
    """Creates metric objects on one registry, so that each declaration below states only
    its name, help, labels and buckets."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def counter(self, name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
        return Counter(name, doc, labels, registry=self.registry)

    def gauge(self, name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
        return Gauge(name, doc, labels, registry=self.registry)

    def histogram(
        self, name: str, doc: str, buckets: Sequence[float], labels: Sequence[str] = ()
    ) -> Histogram:
        return Histogram(name, doc, labels, buckets=buckets, registry=self.registry)


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        new = Families(registry)
        self.requests = new.counter(
            ROUTER_REQUESTS,
            "Requests finished by the router, by API route, outcome and routing policy.",
            ("route", "status", "policy"),
        )
        self.in_flight = new.gauge(ROUTER_IN_FLIGHT, "Requests the router is serving now.")
        self.ttft = new.histogram(
            ROUTER_TTFT,
            "Time from request arrival to the first generated token, seen by the router.",
            TTFT_BUCKETS,
            ("mode",),
        )
        self.itl = new.histogram(
            ROUTER_ITL,
            "Time between consecutive streamed tokens, seen by the router.",
            ITL_BUCKETS,
            ("mode",),
        )
        self.e2e = new.histogram(
            ROUTER_E2E, "Time from request arrival to its last token.", E2E_BUCKETS, ("mode",)
        )
        self.routing = new.counter(
            ROUTER_ROUTING,
            "Routing decisions: colocated (one worker) or disaggregated (prefill + decode).",
            ("mode",),
        )
        self.workers_healthy = new.gauge(
            ROUTER_WORKERS_HEALTHY,
            "Workers that answered the last health poll, by role.",
            ("role",),
        )
        self.prompt_tokens = new.counter(
            ROUTER_PROMPT_TOKENS, "Prompt tokens of finished requests."
        )
        self.generation_tokens = new.counter(
            ROUTER_GENERATION_TOKENS, "Generated tokens of finished requests."
        )
        self.queue_time = new.histogram(
            ROUTER_QUEUE_TIME,
            "Time from request arrival to its admission (waiting for a free slot).",
            QUEUE_BUCKETS,
        )
        self.breaker_state = new.gauge(
            ROUTER_BREAKER_STATE,
            "Per-worker circuit breaker: 0 closed, 1 half-open (awaiting its probe), 2 open.",
            ("worker", "role"),
        )
        self.retries = new.counter(
            ROUTER_RETRIES,
            "Attempts repeated after a worker failed before the first token, by failed stage "
            "and where the retry went (another worker, or colocated as the last resort).",
            ("stage", "target"),
        )
        self.migrations = new.counter(
            ROUTER_MIGRATIONS,
            "Streams moved to another decode worker after their first token, by outcome.",
            ("outcome",),
        )
        self.rejected = new.counter(
            ROUTER_REJECTED,
            "Requests refused before any worker was touched, by reason "
            "(overload, queue_timeout, rate_limit, unauthenticated).",
            ("reason",),
        )
        self.queued = new.gauge(ROUTER_QUEUED, "Requests waiting for an admission slot.")
        self.routing_ctx = RoutingMetrics(registry)


class RoutingMetrics:
    """Context-aware routing: worker choice, prefix hits, the KV index and its events."""

    def __init__(self, registry: CollectorRegistry) -> None:
        new = Families(registry)
        self.decisions = new.counter(
            ROUTER_SCHEDULING_DECISIONS,
            "Worker choices by pool, policy and outcome (prefix_hit, no_prefix, no_candidate).",
            ("pool", "policy", "outcome"),
        )
        self.plugin_seconds = new.histogram(
            ROUTER_SCHEDULING_PLUGIN_SECONDS,
            "Time spent in one scheduling plugin (filter, scorer or picker) per request.",
            SCHEDULING_BUCKETS,
            ("pool", "plugin"),
        )
        self.prefix_tokens = new.counter(
            ROUTER_PREFIX_TOKENS,
            "Prompt tokens the chosen worker already held (hit) or not (miss), per the index.",
            ("pool", "result"),
        )
        self.prefix_requests = new.counter(
            ROUTER_PREFIX_REQUESTS,
            "Requests sent to a worker holding at least one block of the prompt (hit) or not.",
            ("pool", "result"),
        )
        self.disaggregation = new.counter(
            ROUTER_DISAGGREGATION,
            "Colocated-or-disaggregated decisions, by decision and reason.",
            ("decision", "reason"),
        )
        self.index_blocks = new.gauge(
            ROUTER_KV_INDEX_BLOCKS,
            "Distinct block hashes in the router's prefix index, by mode (events, approximate).",
            ("mode",),
        )
        self.event_lag = new.histogram(
            ROUTER_KV_EVENT_LAG,
            "Time from a worker publishing a KV event batch to the router applying it.",
            EVENT_LAG_BUCKETS,
        )
        self.event_resyncs = new.counter(
            ROUTER_KV_EVENT_RESYNCS,
            "KV event stream resynchronisations (join, gap, replay_failed).",
            ("reason",),
        )
        self.hash_mismatches = new.counter(
            ROUTER_KV_HASH_MISMATCHES,
            "Engine block hashes the router could not reproduce (hash algorithm or seed differ).",
        )


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry, role: str) -> None:
        self.role = role
        new = Families(registry)
        self.requests = new.counter(
            WORKER_REQUESTS,
            "Requests finished by this worker, by stage and outcome.",
            ("role", "stage", "status"),
        )
        self.in_flight = new.gauge(WORKER_IN_FLIGHT, "Requests running on this worker.", ("role",))
        self.ttft = new.histogram(
            WORKER_TTFT,
            "Time from the worker receiving a request to its first output.",
            TTFT_BUCKETS,
            ("role", "stage"),
        )
        self.e2e = new.histogram(
            WORKER_E2E,
            "Time from the worker receiving a request to its last output.",
            E2E_BUCKETS,
            ("role", "stage"),
        )
        self.kv_handles = new.counter(
            WORKER_KV_HANDLES,
            "KV handles produced (prefill) or consumed (decode), by transport.",
            ("role", "transport", "direction"),
        )
        self.kv_incompatible = new.counter(
            WORKER_KV_INCOMPATIBLE,
            "KV handles refused because the producer's layout does not match this worker.",
            ("role",),
        )
        self.kv_transfer_bytes = new.counter(
            WORKER_KV_TRANSFER_BYTES,
            "KV bytes a decode worker obtained from prefill workers (the blocks its KV "
            "handles name), by transport; equals the kv_transfer spans' pdserve.kv.bytes.",
            ("role", "transport"),
        )


# vLLM's engine metrics (running/waiting requests, KV cache usage, prefix cache hits,
# tokens, NIXL transfers, ...) keep vLLM's own names, so queries written for vLLM work
# unchanged; a worker re-exports them with its `role` so the pools can be told apart.
VLLM_PREFIX = "vllm:"
ROLE_LABEL = "role"


class WithRole(Collector):
    """``registry`` with ``role`` added to every vLLM metric family that lacks it."""

    def __init__(self, registry: Collector, role: str) -> None:
        self.registry = registry
        self.role = role

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():
            if not family.name.startswith(VLLM_PREFIX):
                yield family
                continue
            role = self.role
            labelled = Metric(family.name, family.documentation, family.type, family.unit)
            labelled.samples = [
                s if ROLE_LABEL in s.labels else s._replace(labels={**s.labels, ROLE_LABEL: role})
                for s in family.samples
            ]
            yield labelled


def serve_metrics(
    host: str, port: int, registry: CollectorRegistry, role: str | None = None
) -> ThreadingHTTPServer:
    """Serve ``registry`` at /metrics in the Prometheus text format, from a daemon thread;
    with ``role``, vLLM's metrics carry it (see ``WithRole``).

    Always the text format: prometheus_client's own server switches to OpenMetrics when a
    scraper asks for it, and its OpenMetrics output renames vLLM's ``vllm:*`` metrics to
    ``vllm_*``, which would break every dashboard query written against vLLM's names.
    """

    source: Collector = registry if role is None else WithRole(registry, role)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] not in ("/metrics", "/"):
                self.send_error(404)
                return
            body = generate_latest(source)
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE_LATEST)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # scrapes every few seconds would flood the worker log

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
