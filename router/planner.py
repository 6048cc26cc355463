"""Per request: colocated (one worker does both) or disaggregated (prefill, then decode),
and which workers.

The decode worker is chosen first (it streams the tokens and may already hold part of
the prompt); then a KV-compatible prefill worker; then the disaggregation decision
compares, with the transfer-cost model, prefilling on the decode worker with prefilling
elsewhere and moving the KV.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from pdserve.config import Role
from pdserve.errors import NoCapacityError
from pdserve.metrics import RoutingMetrics
from pdserve.router.scheduling.cost import TransferCostModel
from pdserve.router.scheduling.policy import Pick, Policy
from pdserve.router.scheduling.request import SchedulingRequest
from pdserve.router.workers import WorkerClient, WorkerPool
from pdserve.scheduling_config import DisaggregationConfig, DisaggregationMode


class Mode(enum.StrEnum):
    COLOCATED = "colocated"
    DISAGGREGATED = "disaggregated"


@dataclass(frozen=True)
class Plan:
    mode: Mode
    decode: WorkerClient  # the worker that streams tokens (and prefills when colocated)
    prefill: WorkerClient | None = None
    reason: str = ""  # why this mode (the disaggregation decision)
    cached_tokens: int = 0  # prompt tokens the decode worker holds, per the prefix index

    @property
    def route(self) -> str:
        """One line for the x-pdserve-route response header (debugging)."""
        parts = [self.mode.value, f"decode={self.decode.name}"]
        if self.prefill is not None:
            parts.append(f"prefill={self.prefill.name}")
        parts += [f"reason={self.reason}", f"cached_tokens={self.cached_tokens}"]
        return "; ".join(parts)


@dataclass(frozen=True)
class Decision:
    disaggregate: bool
    reason: str
    colocated_s: float = 0.0  # estimated time to first token, colocated
    disaggregated_s: float = 0.0


class DisaggregationDecider:
    """``auto``: colocate when the decode worker lacks fewer than ``min_uncached_tokens``
    prompt tokens; otherwise whichever is estimated to reach the first token sooner:

    colocated     = queue(D) + prefill(uncached on D) x (1 + interference x running(D))
    disaggregated = queue(P) + prefill(uncached on P) + KV bytes(uncached on D) / link
                    + overhead

    where queue(W) = waiting(W) x prefill time of this request, and the interference
    term charges the stall a colocated prefill inflicts on D's running streams.
    """

    def __init__(self, config: DisaggregationConfig) -> None:
        self.config = config
        self.cost = TransferCostModel(
            config.link_bytes_per_s, config.prefill_tokens_per_s, config.overhead_s
        )

    def decide(self, prompt_len: int, decode: Pick, prefill: Pick) -> Decision:
        c = self.config
        if c.mode is DisaggregationMode.ALWAYS:
            return Decision(True, "always")
        if c.mode is DisaggregationMode.NEVER:
            return Decision(False, "never")
        uncached_d = max(prompt_len - decode.cached_tokens, 0)
        if uncached_d < c.min_uncached_tokens:
            return Decision(False, "short_uncached")
        d, p = decode.worker, prefill.worker
        local_s = self.cost.prefill_s(uncached_d)
        running_d = max(d.load.running_requests, d.in_flight)
        colocated_s = d.load.waiting_requests * local_s + local_s * (
            1 + c.decode_interference * running_d
        )
        remote_s = self.cost.prefill_s(max(prompt_len - prefill.cached_tokens, 0))
        disaggregated_s = (
            p.load.waiting_requests * remote_s
            + remote_s
            + self.cost.transfer_s(d, uncached_d)
            + self.cost.overhead_s
        )
        if disaggregated_s < colocated_s:
            return Decision(True, "cost_model", colocated_s, disaggregated_s)
        return Decision(False, "transfer_cost", colocated_s, disaggregated_s)


class Planner:
    """Disaggregate when a prefill and a decode worker are healthy and the decider says
    it pays; otherwise colocate on a colocated or decode worker, so losing the prefill
    pool degrades, not fails."""

    def __init__(
        self,
        pool: WorkerPool,
        prefill_policy: Policy,
        decode_policy: Policy,
        disaggregation: DisaggregationConfig | None = None,
        metrics: RoutingMetrics | None = None,
    ) -> None:
        self.pool = pool
        self.prefill_policy = prefill_policy
        self.decode_policy = decode_policy
        self.decider = DisaggregationDecider(disaggregation or DisaggregationConfig())
        self.metrics = metrics

    @property
    def policy_name(self) -> str:
        """The routing policy in effect, for the requests metric's ``policy`` label: its
        name when both pools use the same one, else ``PREFILL/DECODE``."""
        prefill, decode = self.prefill_policy.name, self.decode_policy.name
        return decode if prefill == decode else f"{prefill}/{decode}"

    def plan(
        self,
        prompt_token_ids: Sequence[int],
        exclude: Collection[str] = (),
        colocated: bool = False,
        session_key: str | None = None,
        cache_salt: str | None = None,
    ) -> Plan:
        """``exclude``: worker addresses not to use (a retry after they failed);
        ``colocated``: one worker only (a migrated stream, the last-resort fallback);
        ``session_key``: for session affinity; ``cache_salt``: the tenant's prefix-cache
        salt (prefix scores then count only that tenant's cached blocks)."""
        request = SchedulingRequest(prompt_token_ids, session_key, cache_salt=cache_salt)
        # The healthy and role filters, in one pass over the pool (its notion of healthy
        # includes circuit breakers); the policies' own filters run on what is left.
        by_role: dict[Role, list[WorkerClient]] = {role: [] for role in Role}
        for w in self.pool.healthy(*Role):
            if w.address not in exclude:
                by_role[w.role].append(w)

        def healthy(role: Role) -> list[WorkerClient]:
            return by_role[role]

        never = self.decider.config.mode is DisaggregationMode.NEVER
        prefill_req = request.for_stage((Role.PREFILL,), None)
        prefills = []
        if not (colocated or never):
            prefills = self.prefill_policy.eligible(healthy(Role.PREFILL), prefill_req)
        decode_req = request.for_stage((Role.DECODE,), None)
        decodes = self.decode_policy.eligible(healthy(Role.DECODE), decode_req) if prefills else []
        if prefills and decodes:
            decode = self.decode_policy.choose(decodes, decode_req)
            compatible_req = request.for_stage((Role.PREFILL,), decode.worker)
            compatible = self.prefill_policy.eligible(prefills, compatible_req)
            if compatible:
                prefill = self.prefill_policy.choose(compatible, compatible_req)
                decision = self.decider.decide(request.prompt_len, decode, prefill)
                self._count(decision)
                self.decode_policy.commit(decode, decode_req)
                if decision.disaggregate:
                    self.prefill_policy.commit(prefill, compatible_req)
                    return Plan(
                        Mode.DISAGGREGATED,
                        decode.worker,
                        prefill.worker,
                        decision.reason,
                        decode.cached_tokens,
                    )
                return Plan(
                    Mode.COLOCATED, decode.worker, None, decision.reason, decode.cached_tokens
                )
        reason = "colocated_only" if colocated else "no_prefill"
        for roles in ((Role.BOTH,), (Role.DECODE,)):
            local_req = request.for_stage(roles, None)
            candidates = self.decode_policy.eligible(healthy(roles[0]), local_req)
            if candidates:
                pick = self.decode_policy.choose(candidates, local_req)
                self.decode_policy.commit(pick, local_req)
                self._count(Decision(False, reason))
                return Plan(Mode.COLOCATED, pick.worker, None, reason, pick.cached_tokens)
        if self.metrics is not None:
            self.metrics.decisions.labels("decode", self.decode_policy.name, "no_candidate").inc()
        raise NoCapacityError("no healthy worker can serve this request; retry later")

    def _count(self, decision: Decision) -> None:
        if self.metrics is not None:
            label = Mode.DISAGGREGATED if decision.disaggregate else Mode.COLOCATED
            self.metrics.disaggregation.labels(label.value, decision.reason).inc()

    def can_serve(self) -> bool:
        return bool(self.pool.healthy(Role.BOTH, Role.DECODE))
