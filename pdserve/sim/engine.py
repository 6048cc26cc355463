"""A discrete-event simulator of a pdserve cluster: router, prefill and decode pools (or
colocated workers), KV transfer links.

Time only moves from event to event (a heap), so hundreds of workers and thousands of
requests per second simulate in seconds. Decode workers batch continuously: a request
joins at the next step boundary, gets one token per step and leaves after its last one;
a step's cost depends on the batch (ServiceModel). Per-request token times are not kept:
a request's tokens are the steps between its join and its exit, and each step's
duration is recorded once with its batch size, which gives exact ITL percentiles.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from pdserve.sim.model import ServiceModel


@dataclass
class SimRequest:
    id: int
    arrival: float
    prompt_tokens: int
    output_tokens: int
    first_token: float | None = None
    finished: float | None = None
    on_done: Callable[[SimRequest], None] | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def tpot(self) -> float | None:
        if self.first_token is None or self.finished is None or self.output_tokens < 2:
            return None
        return (self.finished - self.first_token) / (self.output_tokens - 1)


class Loop:
    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()

    def at(self, time: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (time, next(self._seq), action))

    def after(self, delay: float, action: Callable[[], None]) -> None:
        self.at(self.now + delay, action)

    def run(self, until: float = float("inf")) -> None:
        while self._heap and self._heap[0][0] <= until:
            self.now, _, action = heapq.heappop(self._heap)
            action()


@dataclass
class StepLog:
    """Every decode step: (duration, sequences for which it was an inter-token gap)."""

    steps: list[tuple[float, int]] = field(default_factory=list)


class DecodeWorker:
    """Continuous batching; colocated workers also prefill, in chunks, inside the steps."""

    def __init__(
        self, loop: Loop, model: ServiceModel, log: StepLog, colocated: bool, rng: random.Random
    ) -> None:
        self.loop, self.model, self.log, self.colocated = loop, model, log, colocated
        self.rng = rng  # draws each step's spread (ServiceModel.step_factor)
        self.waiting: deque[SimRequest] = deque()  # KV arrived (or, colocated: to prefill)
        # Running sequences by the step that gives their last token: O(log n) per exit.
        self.running: list[tuple[int, int, SimRequest]] = []
        self.step_no = 0
        self._joined: list[SimRequest] = []  # in the current step: their first token
        self.kv_tokens = 0
        self.stepping = False
        self.link_free_at = 0.0
        self.assigned = 0  # requests routed here and not finished (routing load)
        self._prefill_left: dict[int, int] = {}

    @property
    def load_tokens(self) -> int:
        return self.kv_tokens + sum(r.prompt_tokens for r in self.waiting)

    def transfer_in(self, request: SimRequest) -> None:
        """The KV of a prefilled request starts moving over this worker's link."""
        start = max(self.loop.now, self.link_free_at)
        self.link_free_at = start + self.model.transfer_s(request.prompt_tokens)
        self.loop.at(self.link_free_at, lambda: self.admit(request))

    def admit(self, request: SimRequest) -> None:
        if self.colocated:
            self._prefill_left[request.id] = request.prompt_tokens
        self.waiting.append(request)
        self._kick()

    def _kick(self) -> None:
        if not self.stepping and (self.waiting or self.running):
            self.stepping = True
            self.loop.after(0.0, self._step)

    def _step(self) -> None:
        m = self.model
        prefill_tokens = 0
        joined: list[SimRequest] = []
        budget = m.chunk_tokens
        while self.waiting:
            r = self.waiting[0]
            need = r.prompt_tokens + r.output_tokens
            if self.running and self.kv_tokens + need > m.decode_kv_capacity_tokens:
                break  # no KV room: wait for running sequences to finish
            if self.colocated:
                if budget <= 0:
                    break
                chunk = min(budget, self._prefill_left[r.id])
                budget -= chunk
                prefill_tokens += chunk
                self._prefill_left[r.id] -= chunk
                if self._prefill_left[r.id] > 0:
                    break  # the rest of this prompt goes into the next steps
                del self._prefill_left[r.id]
            self.waiting.popleft()
            self.kv_tokens += need
            joined.append(r)
        decoding = len(self.running) + len(joined)
        if decoding == 0 and prefill_tokens == 0:
            self.stepping = False
            return
        step = m.decode_step_s(decoding) * m.step_factor(self.rng)
        duration = step + m.prefill_per_token_s * prefill_tokens
        self.step_no += 1
        for r in joined:
            heapq.heappush(self.running, (self.step_no + r.output_tokens - 1, r.id, r))
        self._joined = joined
        self.loop.after(duration, lambda: self._end_step(duration))

    def _end_step(self, duration: float) -> None:
        now = self.loop.now
        # A sequence's first token is no inter-token gap.
        self.log.steps.append((duration, len(self.running) - len(self._joined)))
        for r in self._joined:
            r.first_token = now
        while self.running and self.running[0][0] <= self.step_no:
            _, _, r = heapq.heappop(self.running)
            r.finished = now
            self.kv_tokens -= r.prompt_tokens + r.output_tokens
            self.assigned -= 1
            if r.on_done is not None:
                r.on_done(r)
        self._step()


class PrefillWorker:
    """FCFS; a batch takes queued prompts up to the model's token budget."""

    def __init__(self, loop: Loop, model: ServiceModel) -> None:
        self.loop, self.model = loop, model
        self.queue: deque[tuple[SimRequest, DecodeWorker]] = deque()
        self.busy = False
        self.assigned = 0

    @property
    def load_tokens(self) -> int:
        return sum(r.prompt_tokens for r, _ in self.queue)

    def submit(self, request: SimRequest, decode: DecodeWorker) -> None:
        self.queue.append((request, decode))
        if not self.busy:
            # Like an engine that drains its input queue before it schedules a step, an
            # idle worker forms its batch after every request of this instant has come
            # (measured: three requests sent together were prefilled as one batch).
            self.busy = True
            self.loop.after(0.0, self._next)

    def _next(self) -> None:
        if not self.queue:
            self.busy = False
            return
        self.busy = True
        batch = [self.queue.popleft()]
        tokens = batch[0][0].prompt_tokens
        while self.queue and tokens + self.queue[0][0].prompt_tokens <= (
            self.model.max_prefill_batch_tokens
        ):
            item = self.queue.popleft()
            tokens += item[0].prompt_tokens
            batch.append(item)
        self.loop.after(self.model.prefill_s(tokens), lambda: self._done(batch))

    def _done(self, batch: list[tuple[SimRequest, DecodeWorker]]) -> None:
        for request, decode in batch:
            self.assigned -= 1
            decode.transfer_in(request)
        self._next()


Worker = PrefillWorker | DecodeWorker
Policy = Callable[[Sequence[Worker], SimRequest, random.Random], Worker]


def round_robin() -> Policy:
    counter = itertools.count()
    return lambda workers, request, rng: workers[next(counter) % len(workers)]


def pick_random(workers: Sequence[Worker], request: SimRequest, rng: random.Random) -> Worker:
    return workers[rng.randrange(len(workers))]


def least_requests(workers: Sequence[Worker], request: SimRequest, rng: random.Random) -> Worker:
    return min(workers, key=lambda w: (w.assigned, rng.random()))


def least_tokens(workers: Sequence[Worker], request: SimRequest, rng: random.Random) -> Worker:
    return min(workers, key=lambda w: (w.load_tokens, w.assigned, rng.random()))


def power_of_two(workers: Sequence[Worker], request: SimRequest, rng: random.Random) -> Worker:
    if len(workers) == 1:
        return workers[0]
    a, b = rng.sample(range(len(workers)), 2)
    return min(workers[a], workers[b], key=lambda w: w.assigned)


POLICIES: dict[str, Callable[[], Policy]] = {
    "round_robin": round_robin,
    "random": lambda: pick_random,
    "power_of_two": lambda: power_of_two,
    "least_requests": lambda: least_requests,
    "least_tokens": lambda: least_tokens,
}


@dataclass(frozen=True)
class Topology:
    prefill: int
    decode: int
    colocated: int = 0

    def describe(self) -> str:
        if self.colocated:
            return f"{self.colocated} colocated"
        return f"{self.prefill}P:{self.decode}D"


class SimCluster:
    """The router and the pools. ``submit`` routes a request at the current time."""

    def __init__(
        self, model: ServiceModel, topology: Topology, policy: str = "round_robin", seed: int = 0
    ) -> None:
        if topology.colocated and (topology.prefill or topology.decode):
            raise ValueError("simulate either colocated workers or prefill/decode pools")
        self.loop = Loop()
        self.model = model
        self.rng = random.Random(seed)
        self.log = StepLog()
        self.prefill = [PrefillWorker(self.loop, model) for _ in range(topology.prefill)]
        colocated = topology.colocated > 0
        n_decode = topology.colocated or topology.decode
        self.decode = [
            DecodeWorker(self.loop, model, self.log, colocated, random.Random(seed + 1 + i))
            for i in range(n_decode)
        ]
        self.pick_prefill = POLICIES[policy]()
        self.pick_decode = POLICIES[policy]()
        self.requests: list[SimRequest] = []

    def submit(self, request: SimRequest) -> None:
        self.requests.append(request)
        self.loop.after(self.model.overhead_s, lambda: self._route(request))

    def _route(self, request: SimRequest) -> None:
        decode = self.pick_decode(self.decode, request, self.rng)
        assert isinstance(decode, DecodeWorker)
        decode.assigned += 1
        if not self.prefill:
            decode.admit(request)
            return
        prefill = self.pick_prefill(self.prefill, request, self.rng)
        assert isinstance(prefill, PrefillWorker)
        prefill.assigned += 1
        prefill.submit(request, decode)


def open_loop(cluster: SimCluster, requests: Iterable[SimRequest]) -> None:
    """Requests arrive at their own ``arrival`` times."""
    for r in requests:
        cluster.loop.at(r.arrival, lambda r=r: cluster.submit(r))  # type: ignore[misc]


def closed_loop(cluster: SimCluster, concurrency: int, lengths: Iterable[tuple[int, int]]) -> None:
    """``concurrency`` clients, each sending its next request when the last one ends."""
    queue = iter(enumerate(lengths))

    def send() -> None:
        item = next(queue, None)
        if item is None:
            return
        i, (prompt, output) = item
        r = SimRequest(i, cluster.loop.now, prompt, output, on_done=lambda _: send())
        cluster.submit(r)

    for _ in range(concurrency):
        cluster.loop.at(0.0, send)
