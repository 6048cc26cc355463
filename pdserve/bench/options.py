"""Command-line flags shared by ``bench serve`` and ``bench compare``, and what they build."""

from __future__ import annotations

import functools
import inspect
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Annotated, Any

import typer

from pdserve.bench.arrival import ArrivalKind, ArrivalSpec, parse_burst, parse_rates, sweep
from pdserve.bench.client import ClientOptions
from pdserve.bench.metrics import DEFAULT_ATTAINMENT, Slo
from pdserve.bench.runner import RunPlan
from pdserve.bench.workloads import (
    BenchRequest,
    GroupOrder,
    Tokenizer,
    WorkloadKind,
    WorkloadSpec,
    build_workload,
)
from pdserve.errors import ConfigError

_W = "Workload"
_A = "Arrival"
_S = "SLO and client"
_O = "Output"

WorkloadOpt = Annotated[WorkloadKind, typer.Option(help="workload kind", rich_help_panel=_W)]
NumRequestsOpt = Annotated[
    int, typer.Option("--num-requests", "-n", help="requests per phase", rich_help_panel=_W)
]
InputLenOpt = Annotated[
    str | None,
    typer.Option(help="input tokens: N, A-B or normal:MEAN,STD (replay: cap)", rich_help_panel=_W),
]
OutputLenOpt = Annotated[
    str | None, typer.Option(help="output tokens, same forms (replay: cap)", rich_help_panel=_W)
]
SeedOpt = Annotated[
    int, typer.Option(help="seed for prompts, lengths, arrivals", rich_help_panel=_W)
]
GroupsOpt = Annotated[int, typer.Option(help="shared-prefix: system prompts", rich_help_panel=_W)]
PrefixLenOpt = Annotated[
    int, typer.Option(help="shared-prefix: system prompt tokens", rich_help_panel=_W)
]
GroupOrderOpt = Annotated[
    GroupOrder,
    typer.Option(help="shared-prefix: interleaved (i mod G) or random order of the groups",
                 rich_help_panel=_W),
]  # fmt: skip
TurnsOpt = Annotated[int, typer.Option(help="multi-turn: turns per session", rich_help_panel=_W)]
ReplayOpt = Annotated[
    Path | None,
    typer.Option(help="replay: ShareGPT-style JSONL or JSON file", rich_help_panel=_W),
]
MaxContextOpt = Annotated[
    int, typer.Option(help="prompt + output never exceed this", rich_help_panel=_W)
]
ConcurrencyOpt = Annotated[
    int | None, typer.Option(help="closed loop: requests in flight (default 4)", rich_help_panel=_A)
]
RateOpt = Annotated[
    float | None,
    typer.Option(help="open loop: Poisson requests/s (inf: all at once)", rich_help_panel=_A),
]
RatesOpt = Annotated[
    str | None, typer.Option(help="sweep: Poisson rates, e.g. 0.5,1,2", rich_help_panel=_A)
]
BurstOpt = Annotated[
    str | None, typer.Option(help="bursts: SIZE:INTERVAL_S, e.g. 8:5", rich_help_panel=_A)
]
MaxConcurrencyOpt = Annotated[
    int | None, typer.Option(help="open loop: cap on requests in flight", rich_help_panel=_A)
]
ThinkTimeOpt = Annotated[
    float, typer.Option(help="multi-turn: seconds between turns", rich_help_panel=_A)
]
SearchOpt = Annotated[
    str | None,
    typer.Option(help="bisect Poisson rates LOW:HIGH[:STEPS] for the goodput rate (needs --slo)",
                 rich_help_panel=_A),
]  # fmt: skip
SloOpt = Annotated[
    str | None, typer.Option(help="e.g. ttft=500ms,tpot=100ms[,e2e=10s]", rich_help_panel=_S)
]
AttainmentOpt = Annotated[
    float, typer.Option(help="fraction meeting the SLO for goodput", rich_help_panel=_S)
]
TimeoutOpt = Annotated[float, typer.Option(help="per-request timeout, s", rich_help_panel=_S)]
IgnoreEosOpt = Annotated[
    bool, typer.Option(help="send ignore_eos so outputs have exact lengths", rich_help_panel=_S)
]
ApiKeyOpt = Annotated[
    str | None, typer.Option(envvar="PDSERVE_API_KEY", help="bearer token", rich_help_panel=_S)
]
ExtraBodyOpt = Annotated[
    str | None, typer.Option(help="JSON merged into every request body", rich_help_panel=_S)
]
WarmupOpt = Annotated[int, typer.Option(help="unmeasured requests first", rich_help_panel=_S)]
OutOpt = Annotated[
    Path | None, typer.Option(help="report folder (default bench-results/TIME)", rich_help_panel=_O)
]
BaselineOpt = Annotated[
    str | None,
    typer.Option(help="target the ratios divide by (default: first)", rich_help_panel=_O),
]
PlotsOpt = Annotated[bool, typer.Option(help="write PNG plots", rich_help_panel=_O)]
ProgressOpt = Annotated[bool, typer.Option(help="live progress bar", rich_help_panel=_O)]


@dataclass(frozen=True)
class CommonFlags:
    """The flags both commands share, gathered once."""

    workload: WorkloadKind
    num_requests: int
    input_len: str | None
    output_len: str | None
    seed: int
    groups: int
    prefix_len: int
    group_order: GroupOrder
    turns: int
    replay: Path | None
    max_context: int
    concurrency: int | None
    rate: float | None
    rates: str | None
    burst: str | None
    max_concurrency: int | None
    think_time: float
    search: str | None
    slo: str | None
    slo_attainment: float
    request_timeout: float
    ignore_eos: bool
    api_key: str | None
    extra_body: str | None
    warmup: int

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["workload"] = self.workload.value
        out["group_order"] = self.group_order.value
        out["replay"] = str(self.replay) if self.replay else None
        out["api_key"] = "***" if self.api_key else None  # never write secrets to a report
        return out

    def workload_spec(self) -> WorkloadSpec:
        return WorkloadSpec(
            kind=self.workload,
            num_requests=self.num_requests,
            input_len=self.input_len,
            output_len=self.output_len,
            seed=self.seed,
            groups=self.groups,
            prefix_len=self.prefix_len,
            group_order=self.group_order,
            turns=self.turns,
            replay_path=self.replay,
            max_context=self.max_context,
        )

    def arrivals(self) -> list[ArrivalSpec]:
        given = [x is not None for x in (self.concurrency, self.rate, self.rates, self.burst)]
        if sum(given) > 1:
            raise ConfigError("give one of --concurrency, --rate, --rates, --burst")
        base = ArrivalSpec(
            concurrency=self.concurrency or 4,
            max_concurrency=self.max_concurrency,
            think_time_s=self.think_time,
            seed=self.seed,
        )
        if self.rates is not None:
            return sweep(base, parse_rates(self.rates))
        if self.rate is not None:
            return [replace(base, kind=ArrivalKind.POISSON, rate=self.rate)]
        if self.burst is not None:
            size, interval = parse_burst(self.burst)
            return [
                replace(base, kind=ArrivalKind.BURST, burst_size=size, burst_interval_s=interval)
            ]
        return [base]

    def search_range(self) -> tuple[float, float, int] | None:
        if self.search is None:
            return None
        if self.slo is None:
            raise ConfigError("--search needs --slo")
        parts = self.search.split(":")
        try:
            low, high = float(parts[0]), float(parts[1])
            steps = int(parts[2]) if len(parts) > 2 else 4
        except (ValueError, IndexError):
            raise ConfigError(f"bad --search {self.search!r}: use LOW:HIGH[:STEPS]") from None
        if not (0 < low < high < math.inf) or steps < 0:
            raise ConfigError("--search needs 0 < LOW < HIGH and STEPS >= 0")
        return low, high, steps

    def plan(self, tokenizer: Tokenizer, model: str) -> RunPlan:
        if not 0 < self.slo_attainment <= 1:
            raise ConfigError("--slo-attainment must be in (0, 1]")
        try:
            extra = json.loads(self.extra_body) if self.extra_body else {}
        except json.JSONDecodeError as e:
            raise ConfigError(f"--extra-body is not JSON: {e}") from e
        if not isinstance(extra, dict):
            raise ConfigError("--extra-body must be a JSON object")
        spec = self.workload_spec()
        workload = build_workload(spec, tokenizer)
        return RunPlan(
            workload=workload,
            phases=self.arrivals(),
            client=ClientOptions(
                model=model,
                ignore_eos=self.ignore_eos,
                timeout_s=self.request_timeout,
                api_key=self.api_key,
                extra_body=extra,
            ),
            slo=Slo.parse(self.slo) if self.slo else None,
            warmup=warmup_requests(spec, tokenizer, self.warmup),
            search=self.search_range(),
            attainment=self.slo_attainment,
        )


# The flags both commands share: (name, annotated type, default), in CommonFlags' order.
_COMMON_PARAMS: tuple[tuple[str, Any, Any], ...] = (
    ("workload", WorkloadOpt, WorkloadKind.RANDOM),
    ("num_requests", NumRequestsOpt, 32),
    ("input_len", InputLenOpt, None),
    ("output_len", OutputLenOpt, None),
    ("seed", SeedOpt, 0),
    ("groups", GroupsOpt, 4),
    ("prefix_len", PrefixLenOpt, 512),
    ("group_order", GroupOrderOpt, GroupOrder.INTERLEAVED),
    ("turns", TurnsOpt, 4),
    ("replay", ReplayOpt, None),
    ("max_context", MaxContextOpt, 2048),
    ("concurrency", ConcurrencyOpt, None),
    ("rate", RateOpt, None),
    ("rates", RatesOpt, None),
    ("burst", BurstOpt, None),
    ("max_concurrency", MaxConcurrencyOpt, None),
    ("think_time", ThinkTimeOpt, 0.0),
    ("search", SearchOpt, None),
    ("slo", SloOpt, None),
    ("slo_attainment", AttainmentOpt, DEFAULT_ATTAINMENT),
    ("request_timeout", TimeoutOpt, 600.0),
    ("ignore_eos", IgnoreEosOpt, True),
    ("api_key", ApiKeyOpt, None),
    ("extra_body", ExtraBodyOpt, None),
    ("warmup", WarmupOpt, 1),
)
_OUTPUT_PARAMS: tuple[tuple[str, Any, Any], ...] = (
    ("out", OutOpt, None),
    ("baseline", BaselineOpt, None),
    ("plots", PlotsOpt, True),
    ("progress", ProgressOpt, True),
)


@dataclass(frozen=True)
class OutputFlags:
    """Where and how the report is written."""

    out: Path | None
    baseline: str | None
    plots: bool
    progress: bool


Command = Callable[..., None]


def with_common_flags(**defaults: Any) -> Callable[[Command], Command]:
    """Give a typer command the shared workload, arrival, SLO and output flags.

    The command declares ``flags: CommonFlags`` and ``output: OutputFlags`` instead of the
    two dozen options; ``defaults`` overrides a shared flag's default for this command.
    """
    table = _COMMON_PARAMS + _OUTPUT_PARAMS
    unknown = set(defaults) - {name for name, _, _ in table}
    if unknown:
        raise TypeError(f"not a shared flag: {sorted(unknown)}")
    common = [name for name, _, _ in _COMMON_PARAMS]
    output = [name for name, _, _ in _OUTPUT_PARAMS]

    def decorate(command: Command) -> Command:
        own = [
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
            for p in inspect.signature(command, eval_str=True).parameters.values()
            if p.name not in ("flags", "output")
        ]
        shared = [
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                annotation=annotation,
                default=defaults.get(name, default),
            )
            for name, annotation, default in table
        ]

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> None:
            flags = CommonFlags(**{name: kwargs.pop(name) for name in common})
            out = OutputFlags(**{name: kwargs.pop(name) for name in output})
            command(flags=flags, output=out, **kwargs)

        params = own + shared
        # typer reads the signature (inspect honours __signature__) and the annotations.
        wrapper.__dict__["__signature__"] = inspect.Signature(params)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper

    return decorate


def warmup_requests(spec: WorkloadSpec, tokenizer: Tokenizer, count: int) -> list[BenchRequest]:
    """Short random requests, unlike the measured prompts, so no measured prefix is cached."""
    if count <= 0:
        return []
    warm = WorkloadSpec(
        kind=WorkloadKind.RANDOM,
        num_requests=count,
        input_len="32",
        output_len="8",
        seed=spec.seed + 7919,
        max_context=spec.max_context,
    )
    try:
        return build_workload(warm, tokenizer).requests
    except ConfigError:
        return []  # a tokenizer we cannot build exact prompts for (replay only): no warm-up
