"""Async streaming client for any OpenAI-compatible ``/v1/completions`` endpoint.

Every request ends as exactly one :class:`RequestResult`, ok or failed with an error
kind; nothing is dropped and ``send`` never raises for a server or network failure.
Times are taken when an SSE event carrying a choice arrives (``time.perf_counter``); an
ITL sample is the gap between two such events (one token each on vLLM; a server that
coalesces tokens into one event shows fewer, longer gaps).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from pdserve.bench.workloads import BenchRequest

_ERROR_BODY_CHARS = 300


@dataclass
class RequestResult:
    """What happened to one request. Times in seconds; ``start_s`` from the phase start."""

    request_id: str
    ok: bool
    start_s: float
    e2e_s: float
    ttft_s: float | None
    itl_s: list[float]
    prompt_tokens: int
    max_tokens: int
    output_tokens: int
    server_prompt_tokens: int | None = None
    finish_reason: str | None = None
    error_kind: str | None = None
    error: str | None = None
    http_status: int | None = None
    session_id: str | None = None
    turn: int = 0

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first: (e2e - ttft) / (tokens - 1)."""
        if not self.ok or self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def end_s(self) -> float:
        return self.start_s + self.e2e_s

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["tpot_s"] = self.tpot_s
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RequestResult:
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**fields)


@dataclass
class ClientOptions:
    """Request shape shared by every request of a run."""

    model: str
    ignore_eos: bool = True
    temperature: float = 0.0
    timeout_s: float = 600.0
    api_key: str | None = None
    extra_body: dict[str, Any] = field(default_factory=dict)


class _Stream:
    """Accumulates one SSE response."""

    def __init__(self) -> None:
        self.first: float | None = None
        self.last: float | None = None
        self.itl: list[float] = []
        self.chunks = 0
        self.usage: dict[str, Any] | None = None
        self.finish_reason: str | None = None
        self.done = False
        self.error: str | None = None

    def feed(self, data: str, now: float) -> None:
        if data == "[DONE]":
            self.done = True
            return
        obj = json.loads(data)
        if not isinstance(obj, dict):
            raise ValueError("an SSE event that is not a JSON object")
        if obj.get("error") and not obj.get("choices"):
            err = obj["error"]
            self.error = str(err.get("message", err) if isinstance(err, dict) else err)
            return
        if isinstance(obj.get("usage"), dict):
            self.usage = obj["usage"]
        choices = obj.get("choices") or []
        if not choices:
            return  # the usage-only event
        # Every event with a choice is a token event even when its text is empty: vLLM
        # streams one per token, and tokens that decode to nothing (special tokens,
        # partial UTF-8) still cost the server a decode step.
        if self.last is None:
            self.first = now
        else:
            self.itl.append(now - self.last)
        self.last = now
        self.chunks += 1
        for choice in choices:
            if choice.get("finish_reason"):
                self.finish_reason = str(choice["finish_reason"])


class StreamingClient:
    """Sends :class:`BenchRequest` s to ``base_url`` (``http://host:port``, with or without /v1)."""

    def __init__(self, base_url: str, options: ClientOptions) -> None:
        base = base_url.rstrip("/")
        self.url = (base if base.endswith("/v1") else base + "/v1") + "/completions"
        self.options = options
        headers = {"Authorization": f"Bearer {options.api_key}"} if options.api_key else {}
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(options.timeout_s, connect=min(options.timeout_s, 30.0)),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
            headers=headers,
            trust_env=False,  # a proxy from the environment would distort every timing
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> StreamingClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def body(self, request: BenchRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.options.model,
            "prompt": request.prompt,
            "max_tokens": request.max_tokens,
            "temperature": self.options.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.options.ignore_eos:
            body["ignore_eos"] = True  # exact output lengths; vLLM and pdserve accept it
        body.update(self.options.extra_body)
        return body

    async def send(self, request: BenchRequest, origin: float) -> RequestResult:
        """Stream one request; ``origin`` is the phase's ``perf_counter`` zero."""
        start = time.perf_counter()
        stream = _Stream()
        status: int | None = None
        kind: str | None = None
        message: str | None = None
        try:
            async with self._http.stream("POST", self.url, json=self.body(request)) as resp:
                status = resp.status_code
                if status != 200:
                    raw = await resp.aread()
                    kind = f"http_{status}"
                    message = raw.decode("utf-8", "replace")[:_ERROR_BODY_CHARS]
                else:
                    async for line in resp.aiter_lines():
                        if line.startswith("data:"):
                            stream.feed(line[5:].strip(), time.perf_counter())
                            if stream.done or stream.error:
                                break
        except httpx.TimeoutException as e:
            kind, message = "timeout", f"{type(e).__name__}: {e}"
        except httpx.ConnectError as e:
            kind, message = "connect", str(e)
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as e:
            kind, message = "disconnect", f"{type(e).__name__}: {e}"
        except httpx.HTTPError as e:
            kind, message = "http_error", f"{type(e).__name__}: {e}"
        except (ValueError, AttributeError, TypeError) as e:
            kind, message = "protocol", f"bad stream event: {e}"
        except Exception as e:  # every request must end as a result, never vanish
            kind, message = "client_error", f"{type(e).__name__}: {e}"
        end = time.perf_counter()
        if kind is None:
            kind, message = _judge(stream)
        usage = stream.usage or {}
        completion = usage.get("completion_tokens")
        prompt = usage.get("prompt_tokens")
        return RequestResult(
            request_id=request.request_id,
            ok=kind is None,
            start_s=start - origin,
            e2e_s=end - start,
            ttft_s=None if stream.first is None else stream.first - start,
            itl_s=stream.itl,
            prompt_tokens=request.prompt_tokens,
            max_tokens=request.max_tokens,
            output_tokens=int(completion) if isinstance(completion, int) else stream.chunks,
            server_prompt_tokens=int(prompt) if isinstance(prompt, int) else None,
            finish_reason=stream.finish_reason,
            error_kind=kind,
            error=message,
            http_status=status,
            session_id=request.session_id,
            turn=request.turn,
        )


def _judge(stream: _Stream) -> tuple[str | None, str | None]:
    """The error kind of a stream that ended without a transport error, or None if ok."""
    if stream.error is not None:
        return "stream_error", stream.error
    if not (stream.done or stream.finish_reason):
        return "incomplete", "the stream ended without a finish reason or [DONE]"
    if stream.chunks == 0:
        return "empty", "the stream carried no token events"
    return None, None
