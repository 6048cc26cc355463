"""How the router schedules: each pool's policy and when it splits prefill from decode.

The ``scheduling`` section of router.yaml (RouterConfig.scheduling in pdserve/config.py).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pdserve.errors import ConfigError


@dataclass(frozen=True)
class PolicyConfig:
    """How one pool's worker is chosen (router/scheduling/policy.py): a named policy,
    optionally with other scorer weights (0 drops a scorer) and a softmax temperature
    (0: always the best score)."""

    name: str = "kv_aware"
    weights: Mapping[str, float] = field(default_factory=dict)
    temperature: float = 0.0

    @classmethod
    def from_dict(cls, where: str, section: Any) -> PolicyConfig:
        if isinstance(section, str):
            return cls(section)
        if not isinstance(section, Mapping) or set(section) - {"policy", "weights", "temperature"}:
            raise ConfigError(f"{where}: give a policy name or {{policy, weights, temperature}}")
        weights = section.get("weights") or {}
        temperature = section.get("temperature", 0.0)
        ok_weights = isinstance(weights, Mapping) and all(
            isinstance(v, int | float) and v >= 0 for v in weights.values()
        )
        if not ok_weights or not isinstance(temperature, int | float) or temperature < 0:
            raise ConfigError(f"{where}: weights must be numbers >= 0, temperature >= 0")
        return cls(str(section.get("policy", cls.name)), dict(weights), float(temperature))


class DisaggregationMode(enum.StrEnum):
    ALWAYS = "always"  # disaggregate whenever a prefill and a decode worker are healthy
    NEVER = "never"  # always colocate on a decode (or colocated) worker
    AUTO = "auto"  # per request, from the uncached prompt length and the cost model


@dataclass(frozen=True)
class DisaggregationConfig:
    """When the router splits a request into prefill and decode (router/planner.py)."""

    mode: DisaggregationMode = DisaggregationMode.ALWAYS
    # auto: colocate when the decode worker lacks fewer prompt tokens than this.
    min_uncached_tokens: int = 256
    # The transfer-cost model: KV link speed, prefill speed, fixed cost of the extra hop.
    link_bytes_per_s: float = 1e9
    prefill_tokens_per_s: float = 1000.0
    overhead_s: float = 0.005
    # Colocated prefill also stalls the decode worker's running streams: each running
    # request adds this share of the prefill time to the colocated cost.
    decode_interference: float = 0.5

    def __post_init__(self) -> None:
        if (
            min(self.min_uncached_tokens, self.overhead_s, self.decode_interference) < 0
            or min(self.link_bytes_per_s, self.prefill_tokens_per_s) <= 0
        ):
            raise ConfigError(f"invalid disaggregation settings: {self}")


@dataclass(frozen=True)
class SchedulingConfig:
    """The ``scheduling`` section of router.yaml (or --prefill-policy/--decode-policy)."""

    prefill: PolicyConfig = field(default_factory=PolicyConfig)
    decode: PolicyConfig = field(default_factory=PolicyConfig)
    disaggregation: DisaggregationConfig = field(default_factory=DisaggregationConfig)

    @classmethod
    def from_dict(cls, section: Mapping[str, Any]) -> SchedulingConfig:
        unknown = set(section) - {"prefill", "decode", "disaggregation"}
        if unknown:
            raise ConfigError(f"scheduling: unknown keys {sorted(unknown)}")
        d = section.get("disaggregation") or {}
        names = {f: f for f in DisaggregationConfig.__dataclass_fields__}
        names |= {"minUncachedTokens": "min_uncached_tokens", "linkBytesPerS": "link_bytes_per_s"}
        names |= {"prefillTokensPerS": "prefill_tokens_per_s", "overheadS": "overhead_s"}
        names |= {"decodeInterference": "decode_interference"}
        if not isinstance(d, Mapping) or set(d) - set(names):
            raise ConfigError(f"scheduling.disaggregation: known keys are {sorted(names)}")
        try:
            kwargs: dict[str, Any] = {names[k]: v for k, v in d.items()}
            if "mode" in kwargs:
                kwargs["mode"] = DisaggregationMode(kwargs["mode"])
            disaggregation = DisaggregationConfig(**kwargs)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"scheduling.disaggregation: {e}") from e
        return cls(
            prefill=PolicyConfig.from_dict("scheduling.prefill", section.get("prefill", {})),
            decode=PolicyConfig.from_dict("scheduling.decode", section.get("decode", {})),
            disaggregation=disaggregation,
        )
