"""Continuing a stream on another worker after its decode worker failed mid-stream.

The new worker gets the prompt plus every token already streamed as its prompt and the
rest of the token budget; greedy decoding then yields exactly the tokens the first worker
would have produced. The text needs care, because the first worker detokenized
incrementally and may have held text back that the client never saw: the tail of a
partial UTF-8 character, or the last characters that could start a stop string. The new
worker cannot emit those (to it they are prompt), and it cannot see a stop string that
spans the boundary. So after a migration the router computes the text itself from all
generated token ids (the same tokenizer, no clean-up, special tokens skipped -- what
vLLM's detokenizer does), emits what the client has not seen, applies the stop strings
over the whole generated text, and reports usage for the whole request.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from pdserve.v1 import common_pb2 as cpb

if TYPE_CHECKING:  # the service imports this module
    from pdserve.router.service import Delta, GenerateCall

_REPLACEMENT = "\ufffd"  # what a partial UTF-8 sequence decodes to


class TextDecoder(Protocol):
    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids`` as vLLM's detokenizer renders it (no clean-up)."""


@dataclass
class Progress:
    """What the client has received so far."""

    token_ids: list[int] = field(default_factory=list)
    text_parts: list[str] = field(default_factory=list)

    def add(self, delta: Delta) -> None:
        self.token_ids += delta.token_ids
        if delta.text:
            self.text_parts.append(delta.text)

    @property
    def text(self) -> str:
        return "".join(self.text_parts)


class Continuation:
    """Rewrites the deltas of a migrated attempt into the original request's stream."""

    def __init__(self, original: GenerateCall, progress: Progress, decoder: TextDecoder | None):
        self.original = original
        self.base_ids = list(progress.token_ids)
        self.sent_text = progress.text
        self.decoder = decoder
        self.new_ids: list[int] = []
        self.emitted = len(self.sent_text)  # characters of generated text the client has
        sampling = original.sampling
        self.stops = list(sampling.stop)
        self.include_stop = sampling.include_stop_str_in_output
        # Like vLLM: hold back characters that may be the start of a stop string.
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.prompt_text = decoder.decode(original.prompt_token_ids) if decoder else ""
        self.exact_text = decoder is not None

    def call(self, request_id: str) -> GenerateCall:
        """The request for the new worker: prompt + streamed tokens, the remaining budget."""
        sampling = cpb.SamplingParams()
        sampling.CopyFrom(self.original.sampling)
        done = len(self.base_ids)
        sampling.max_tokens = max(1, sampling.max_tokens - done)
        if sampling.HasField("min_tokens"):
            sampling.min_tokens = max(0, sampling.min_tokens - done)
        return dataclasses.replace(
            self.original,
            request_id=request_id,
            prompt_token_ids=list(self.original.prompt_token_ids) + self.base_ids,
            sampling=sampling,
        )

    def feed(self, delta: Delta) -> Delta:
        self.new_ids += delta.token_ids
        finish = delta.finish_reason
        usage = self._usage(delta.usage) if delta.usage is not None else None
        full = self._generated_text()
        if full is None:
            # The tokenizer disagrees with what the client saw: pass the worker's text on.
            return dataclasses.replace(delta, usage=usage)
        hit = self._find_stop(full)
        if hit is not None:
            full, finish = full[:hit], "stop"
            usage = self._usage(None)
        limit = len(full)
        if finish is None:
            limit = min(len(full) - self.hold, len(full.rstrip(_REPLACEMENT)))
        text = full[self.emitted : limit] if limit > self.emitted else ""
        self.emitted = max(self.emitted, limit)
        return dataclasses.replace(delta, text=text, finish_reason=finish, usage=usage)

    def _generated_text(self) -> str | None:
        if not self.exact_text or self.decoder is None:
            return None
        ids = list(self.original.prompt_token_ids) + self.base_ids + self.new_ids
        whole = self.decoder.decode(ids)
        generated = whole[len(self.prompt_text) :]
        if not whole.startswith(self.prompt_text) or not generated.startswith(self.sent_text):
            self.exact_text = False
            return None
        return generated

    def _find_stop(self, text: str) -> int | None:
        """End of the generated text when a stop string occurs in the part the first
        worker could not have checked (it would have stopped on an earlier one)."""
        start = max(0, len(self.sent_text) - self.hold)
        best: int | None = None
        for stop in self.stops:
            i = text.find(stop, start)
            if i >= 0:
                end = i + len(stop) if self.include_stop else i
                best = end if best is None else min(best, end)
        return best

    def _usage(self, usage: cpb.Usage | None) -> cpb.Usage:
        prompt = len(self.original.prompt_token_ids)
        completion = len(self.base_ids) + len(self.new_ids)
        cached = min(usage.cached_prompt_tokens, prompt) if usage is not None else 0
        return cpb.Usage(
            prompt_tokens=prompt, completion_tokens=completion, cached_prompt_tokens=cached
        )
