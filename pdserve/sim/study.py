"""Studies with the simulator: P:D ratios and routing policies at scale, and the check of
the simulator against real `pdserve bench` runs."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdserve.sim.engine import SimCluster, SimRequest, Topology, closed_loop, open_loop
from pdserve.sim.model import ServiceModel
from pdserve.sim.results import SimSummary, summarize

# An illustrative GPU-class profile (an 8B model on one modern GPU per worker, RDMA
# between workers). ASSUMED, not measured here: no GPU is available to this project's
# tests. It sets the scale of the study; the comparisons between policies and ratios are
# what it is for.
GPU_PROFILE = ServiceModel(
    prefill_base_s=0.005,
    prefill_per_token_s=0.00004,  # 25k prompt tokens/s per worker
    decode_base_s=0.008,
    decode_per_seq_s=0.00015,
    kv_bytes_per_token=128 * 1024,  # Llama-3-8B, fp16
    link_bytes_per_s=25e9,  # 200 Gb/s
    link_latency_s=0.0005,
    overhead_s=0.002,
    max_prefill_batch_tokens=8192,
    decode_kv_capacity_tokens=300_000,
)

SLO_TTFT_S = 1.0
SLO_TPOT_S = 0.025


@dataclass(frozen=True)
class Workload:
    prompt: tuple[int, int] = (512, 3072)
    output: tuple[int, int] = (64, 512)

    def poisson(self, rate: float, duration_s: float, seed: int) -> list[SimRequest]:
        rng, t = random.Random(seed), 0.0
        out: list[SimRequest] = []
        while True:
            t += rng.expovariate(rate)
            if t > duration_s:
                return out
            out.append(
                SimRequest(len(out), t, rng.randint(*self.prompt), rng.randint(*self.output))
            )


def simulate(
    model: ServiceModel,
    topology: Topology,
    policy: str,
    rate: float,
    workload: Workload,
    duration_s: float = 60.0,
    warmup_s: float = 10.0,
    seed: int = 0,
) -> SimSummary:
    cluster = SimCluster(model, topology, policy, seed)
    open_loop(cluster, workload.poisson(rate, duration_s, seed))
    cluster.loop.run()
    return summarize(cluster.requests, cluster.log, SLO_TTFT_S, SLO_TPOT_S, since=warmup_s)


RATIOS = (
    Topology(16, 48),
    Topology(24, 40),
    Topology(32, 32),
    Topology(40, 24),
    Topology(48, 16),
    Topology(0, 0, colocated=64),
)
POLICY_NAMES = ("random", "round_robin", "power_of_two", "least_requests", "least_tokens")


def scale_study(
    rates: Sequence[float], model: ServiceModel = GPU_PROFILE, duration_s: float = 60.0
) -> dict[str, Any]:
    """64 workers: every P:D ratio (and all colocated) under least_requests, then every
    policy at 32P:32D."""
    workload = Workload()
    ratios = {
        t.describe(): [
            simulate(model, t, "least_requests", r, workload, duration_s).to_json() for r in rates
        ]
        for t in RATIOS
    }
    policies = {
        p: [simulate(model, Topology(32, 32), p, r, workload, duration_s).to_json() for r in rates]
        for p in POLICY_NAMES
    }
    return {
        "model": model.to_json(),
        "workload": {"prompt_tokens": workload.prompt, "output_tokens": workload.output},
        "slo": {"ttft_s": SLO_TTFT_S, "tpot_s": SLO_TPOT_S},
        "rates": list(rates),
        "ratios": ratios,
        "policies": policies,
    }


def plot_study(study: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    rates = study["rates"]
    written = []
    for key, title, name in (
        ("ratios", "64 workers: P:D ratio (least_requests routing)", "sim-ratios"),
        ("policies", "64 workers, 32P:32D: routing policy", "sim-policies"),
    ):
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        for label, runs in study[key].items():
            axes[0].plot(rates, [r["ttft_p90_s"] for r in runs], marker="o", label=label)
            axes[1].plot(rates, [r["itl_p90_s"] * 1000 for r in runs], marker="o", label=label)
            axes[2].plot(rates, [r["slo_attainment"] for r in runs], marker="o", label=label)
        axes[0].set(xlabel="offered load (req/s)", ylabel="TTFT p90 (s)", yscale="log")
        axes[1].set(xlabel="offered load (req/s)", ylabel="ITL p90 (ms)")
        axes[2].set(xlabel="offered load (req/s)", ylabel="SLO attainment", ylim=(0, 1.02))
        for ax in axes:
            ax.grid(alpha=0.3)
        axes[2].legend(fontsize=8)
        fig.suptitle(title)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# -- validation against real runs -------------------------------------------------


def replay_bench(model: ServiceModel, results_json: Path, topology: Topology) -> SimSummary:
    """Simulate a `pdserve bench` phase with its own requests: the same prompt and output
    lengths and, for open-loop phases, the same send times (closed loops keep the
    concurrency)."""
    doc = json.loads(Path(results_json).read_text())
    phase = doc["targets"][0]["phases"][0]
    done = [r for r in phase["requests"] if r["ok"]]
    cluster = SimCluster(model, topology, "round_robin")
    concurrency = phase["arrival"].get("concurrency")
    if concurrency:
        ordered = sorted(done, key=lambda r: r["start_s"])
        closed_loop(
            cluster, int(concurrency), [(r["prompt_tokens"], r["output_tokens"]) for r in ordered]
        )
    else:
        open_loop(
            cluster,
            [
                SimRequest(i, r["start_s"], r["prompt_tokens"], r["output_tokens"])
                for i, r in enumerate(done)
            ],
        )
    cluster.loop.run()
    return summarize(cluster.requests, cluster.log)


def measured(results_json: Path) -> dict[str, float]:
    m = json.loads(Path(results_json).read_text())["targets"][0]["phases"][0]["metrics"]
    return {
        "ttft_mean_s": m["ttft_s"]["mean"],
        "ttft_p50_s": m["ttft_s"]["p50"],
        "ttft_p90_s": m["ttft_s"]["p90"],
        "itl_mean_s": m["itl_s"]["mean"],
        "itl_p50_s": m["itl_s"]["p50"],
        "itl_p90_s": m["itl_s"]["p90"],
        "request_throughput": m["request_throughput"],
    }
