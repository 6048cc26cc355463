"""Build the pdserve Grafana dashboard as code (grafana-foundation-sdk) and write its JSON.

    python deploy/grafana/build_dashboard.py           # write both copies
    python deploy/grafana/build_dashboard.py --check   # exit 1 if a copy is out of date

The JSON goes to deploy/grafana/pdserve.json (import it by hand) and to the Helm chart's
files/pdserve.json (the Grafana sidecar ConfigMap). Metric names are pdserve's own
(pdserve/metrics.py) or vLLM's `vllm:` engine metrics; tests/unit/test_dashboards.py checks
every query. On Kubernetes, worker series carry `role` (prefill|decode) from the chart's
ServiceMonitor, which is how the pool rows select their workers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# grafana-foundation-sdk is needed to regenerate the JSON, not to run pdserve: type-checking
# must also pass where it is not installed.
from grafana_foundation_sdk.builders import dashboard  # type: ignore[import-not-found, unused-ignore]
from grafana_foundation_sdk.cog.encoder import JSONEncoder  # type: ignore[import-not-found, unused-ignore]
from grafana_foundation_sdk.models import dashboard as dm  # type: ignore[import-not-found, unused-ignore]

# The package path, not a bare sibling import: it resolves the same whether this file runs
# as a script, is loaded from its path (tests/unit/test_dashboards.py) or is type-checked.
from pdserve.deploy.grafana.panels import (
    DATASOURCE,
    percentiles,
    quantile,
    query,
    rate,
    sel,
    series,
    single,
)

REPO = Path(__file__).resolve().parents[2]
OUTPUTS = (REPO / "deploy/grafana/pdserve.json", REPO / "deploy/helm/pdserve/files/pdserve.json")

# Router request outcomes that are the server's fault: HTTP 5xx and gRPC server-side codes.
ROUTER_ERRORS = 'status=~"5..|INTERNAL|UNAVAILABLE|UNKNOWN|DATA_LOSS|DEADLINE_EXCEEDED"'
DECODE = 'role="decode"'
DISAGGREGATED = 'mode="disaggregated"'
HIT = 'result="hit"'


def overview() -> list[Any]:
    errors = (
        f"sum({rate('pdserve_router_requests_total', ROUTER_ERRORS)}) / "
        f"sum({rate('pdserve_router_requests_total')})"
    )
    return [
        single("Requests/s", "reqps", f"sum({rate('pdserve_router_requests_total')})"),
        single("Error ratio", "percentunit", errors, "HTTP 5xx and gRPC server errors."),
        single("In flight", "short", f"sum(pdserve_router_requests_in_flight{sel()})"),
        single(
            "TTFT p90",
            "s",
            quantile(0.9, "pdserve_router_time_to_first_token_seconds"),
        ),
        series(
            "Requests/s by route and status",
            "reqps",
            [
                query(
                    f"sum by (route, status) ({rate('pdserve_router_requests_total')})",
                    "{{route}} {{status}}",
                )
            ],
        ),
        percentiles(
            "Time to first token (router)",
            "pdserve_router_time_to_first_token_seconds",
            description="From request arrival at the router to the first generated token.",
        ),
        percentiles(
            "Inter-token latency (router)",
            "pdserve_router_inter_token_latency_seconds",
            description="Between consecutive streamed tokens, as the client sees them.",
        ),
        percentiles("End-to-end latency", "pdserve_router_request_duration_seconds"),
        series(
            "Tokens/s",
            "short",
            [
                query(f"sum({rate('pdserve_router_prompt_tokens_total')})", "prompt"),
                query(f"sum({rate('pdserve_router_generation_tokens_total')})", "generated"),
            ],
        ),
        series(
            "Healthy workers",
            "short",
            [
                query(
                    f"max by (role) (pdserve_router_workers_healthy{sel()})",
                    "{{role}}",
                )
            ],
            "Workers that answered the router's last health poll.",
        ),
    ]


def pool(role: str) -> list[Any]:
    r = f'role="{role}"'
    panels = [
        series(
            "Running and waiting requests",
            "short",
            [
                query(f"sum by (pod) (vllm:num_requests_running{sel(r)})", "running {{pod}}"),
                query(f"sum by (pod) (vllm:num_requests_waiting{sel(r)})", "waiting {{pod}}"),
            ],
        ),
        series(
            "KV cache usage",
            "percentunit",
            [query(f"max by (pod) (vllm:kv_cache_usage_perc{sel(r)})", "{{pod}}")],
            "Share of the engine's KV blocks in use; near 1 requests queue or get preempted.",
        ),
        series(
            "Worker requests/s by outcome",
            "reqps",
            [
                query(
                    f"sum by (stage, status) ({rate('pdserve_worker_requests_total', r)})",
                    "{{stage}} {{status}}",
                )
            ],
        ),
        percentiles(
            "Time to first output (worker)",
            "pdserve_worker_time_to_first_token_seconds",
            r,
            description="From the worker receiving a request to its first output.",
        ),
        percentiles("Engine queue time", "vllm:request_queue_time_seconds", r),
    ]
    if role == "prefill":
        hits = f"sum({rate('vllm:prefix_cache_hits_total', r)})"
        queries = f"sum({rate('vllm:prefix_cache_queries_total', r)})"
        panels += [
            series(
                "Prompt tokens/s",
                "short",
                [query(f"sum by (pod) ({rate('vllm:prompt_tokens_total', r)})", "{{pod}}")],
            ),
            series(
                "Prefix cache hit ratio",
                "percentunit",
                [query(f"{hits} / {queries}", "hit ratio")],
            ),
        ]
    else:
        panels += [
            series(
                "Generated tokens/s",
                "short",
                [query(f"sum by (pod) ({rate('vllm:generation_tokens_total', r)})", "{{pod}}")],
            ),
            percentiles("Inter-token latency (engine)", "vllm:inter_token_latency_seconds", r),
            series(
                "Preemptions/s",
                "short",
                [query(f"sum by (pod) ({rate('vllm:num_preemptions_total', r)})", "{{pod}}")],
                "Running requests evicted for lack of KV blocks.",
            ),
        ]
    return panels


def kv_transfer() -> list[Any]:
    xfer = "vllm:nixl_xfer_time_seconds"
    return [
        series(
            "KV handles/s",
            "short",
            [
                query(
                    "sum by (role, transport, direction) "
                    f"({rate('pdserve_worker_kv_handles_total')})",
                    "{{role}} {{direction}} ({{transport}})",
                )
            ],
            "Handles produced by prefill workers and consumed by decode workers.",
        ),
        percentiles("Transfer time (NIXL)", xfer),
        series(
            "Transfer throughput",
            "Bps",
            [query(f"sum({rate('vllm:nixl_bytes_transferred_sum')})", "bytes/s")],
        ),
        series(
            "Bytes per transfer",
            "bytes",
            [
                query(
                    f"sum({rate('vllm:nixl_bytes_transferred_sum')}) / "
                    f"sum({rate('vllm:nixl_bytes_transferred_count')})",
                    "mean",
                )
            ],
        ),
        series(
            "Failures",
            "short",
            [
                query(f"sum({rate('vllm:nixl_num_failed_transfers_total')})", "failed/s"),
                query(f"sum({rate('vllm:nixl_num_kv_expired_reqs_total')})", "lease expired/s"),
                query(f"sum({rate('pdserve_worker_kv_incompatible_total')})", "incompatible/s"),
                query(
                    f"sum by (reason) ({rate('pdserve_kv_transfer_failures_total')})",
                    "grpc {{reason}}/s",
                ),
                query(
                    f"sum({rate('pdserve_kv_transfer_lease_expirations_total')})",
                    "grpc lease expired/s",
                ),
            ],
            "Failed transfers (NIXL, grpc by reason), prefill KV freed before the decode side "
            "fetched it, layout mismatches.",
        ),
        percentiles(
            "Transfer time (grpc transport)",
            "pdserve_kv_transfer_duration_seconds",
            description="--kv-transport grpc: fetch, verify and store one request's KV "
            "(decode side).",
        ),
        series(
            "Transfer throughput (grpc transport)",
            "Bps",
            [
                query(
                    f"sum by (role) ({rate('pdserve_kv_transfer_bytes_received_total')})",
                    "received {{role}}",
                ),
                query(
                    f"sum by (role) ({rate('pdserve_kv_transfer_bytes_sent_total')})",
                    "sent {{role}}",
                ),
                query(
                    f"sum by (role) ({rate('pdserve_kv_transfer_shm_bytes_received_total')})",
                    "received via /dev/shm {{role}}",
                ),
            ],
        ),
        series(
            "Decode prompt tokens by source",
            "short",
            [
                query(
                    f"sum by (source) ({rate('vllm:prompt_tokens_by_source_total', DECODE)})",
                    "{{source}}",
                )
            ],
            "external_kv_transfer: tokens whose KV came from a prefill worker.",
        ),
    ]


def routing() -> list[Any]:
    decisions = "pdserve_router_routing_decisions_total"
    hits = f"sum by (role) ({rate('vllm:prefix_cache_hits_total')})"
    queries = f"sum by (role) ({rate('vllm:prefix_cache_queries_total')})"
    return [
        series(
            "Routing decisions/s",
            "short",
            [query(f"sum by (mode) ({rate(decisions)})", "{{mode}}")],
            "colocated: one worker does both; disaggregated: prefill then decode.",
        ),
        series(
            "Disaggregated share",
            "percentunit",
            [
                query(
                    f"sum({rate(decisions, DISAGGREGATED)}) / sum({rate(decisions)})",
                    "disaggregated",
                )
            ],
        ),
        series(
            "TTFT p90 by mode",
            "s",
            [
                query(
                    quantile(0.9, "pdserve_router_time_to_first_token_seconds", by="mode"),
                    "{{mode}}",
                )
            ],
        ),
        series(
            "Router prefix hit ratio",
            "percentunit",
            [
                query(
                    f"sum by (pool) ({rate('pdserve_router_prefix_cache_tokens_total', HIT)}) / "
                    f"sum by (pool) ({rate('pdserve_router_prefix_cache_tokens_total')})",
                    "{{pool}}",
                )
            ],
            "Prompt tokens the chosen worker already held, per the router's prefix index "
            "(kv_aware policies).",
        ),
        series(
            "Disaggregation decisions/s",
            "short",
            [
                query(
                    f"sum by (decision, reason) "
                    f"({rate('pdserve_router_disaggregation_decisions_total')})",
                    "{{decision}} ({{reason}})",
                )
            ],
            "Why a request was served colocated or split (conditional disaggregation).",
        ),
        series(
            "Prefix cache hit ratio by pool",
            "percentunit",
            [query(f"{hits} / {queries}", "{{role}}")],
        ),
        series(
            "Requests in flight per worker",
            "short",
            [
                query(
                    f"sum by (role, pod) (pdserve_worker_requests_in_flight{sel()})",
                    "{{role}} {{pod}}",
                )
            ],
            "How evenly the router spreads load.",
        ),
        percentiles(
            "Admission queue time (router)",
            "pdserve_router_queue_time_seconds",
            description="From arrival to admission: waiting for a free slot when the router "
            "runs its in-flight limit.",
        ),
    ]


def reliability() -> list[Any]:
    return [
        series(
            "Circuit breakers",
            "short",
            [
                query(
                    f"max by (role, worker) (pdserve_router_worker_circuit_state{sel()})",
                    "{{role}} {{worker}}",
                )
            ],
            "Per worker: 0 closed, 1 half-open (awaiting its probe), 2 open (no traffic).",
        ),
        series(
            "Retries and migrations/s",
            "short",
            [
                query(
                    f"sum by (stage, target) ({rate('pdserve_router_retries_total')})",
                    "retry {{stage}} -> {{target}}",
                ),
                query(
                    f"sum by (outcome) ({rate('pdserve_router_migrations_total')})",
                    "migration {{outcome}}",
                ),
            ],
            "Retries: a worker failed before the first token. Migrations: a stream moved to "
            "another decode worker after it.",
        ),
        series(
            "Admission: rejected and queued",
            "short",
            [
                query(
                    f"sum by (reason) ({rate('pdserve_router_rejected_requests_total')})",
                    "rejected {{reason}}/s",
                ),
                query(f"sum(pdserve_router_requests_queued{sel()})", "queued"),
            ],
            "Refused before any worker was touched (overload, queue timeout, rate limit, "
            "authentication); requests waiting for a slot.",
        ),
    ]


def build() -> dict[str, Any]:
    """The dashboard as a JSON-ready dict."""
    board = (
        dashboard.Dashboard("pdserve")
        .uid("pdserve")
        .description("Disaggregated prefill/decode serving: traffic, pools, KV transfer.")
        .tags(["pdserve", "vllm", "llm"])
        .refresh("30s")
        .time("now-1h", "now")
        .timezone("browser")
        .with_variable(
            dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus")
        )
        .with_variable(
            dashboard.QueryVariable("namespace")
            .label("Namespace")
            .datasource(DATASOURCE)
            .query("label_values(pdserve_router_requests_in_flight, namespace)")
            .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(dm.VariableSort.ALPHABETICAL_ASC)
            .include_all(True)
            .all_value(".*")
        )
    )
    rows = [
        ("Overview", overview()),
        ("Prefill pool", pool("prefill")),
        ("Decode pool", pool("decode")),
        ("KV transfer", kv_transfer()),
        ("Routing and cache", routing()),
        ("Reliability", reliability()),
    ]
    panel_id = 0
    for title, panels in rows:
        panel_id += 1
        board = board.with_row(dashboard.Row(title).id(panel_id))
        for panel in panels:
            panel_id += 1
            board = board.with_panel(panel.id(panel_id))
    built: dict[str, Any] = json.loads(json.dumps(board.build(), cls=JSONEncoder))
    return built


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a copy is out of date")
    args = parser.parse_args()
    text = render()
    stale = [p for p in OUTPUTS if not p.is_file() or p.read_text() != text]
    if args.check:
        for path in stale:
            print(f"out of date: {path.relative_to(REPO)}", file=sys.stderr)
        return 1 if stale else 0
    for path in OUTPUTS:
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
