"""Hostile input against the router's HTTP and gRPC APIs: property-based (hypothesis)
and the classic cases. Every answer is a clear 4xx / client-error status, never a 5xx or
INTERNAL/UNKNOWN, and the router keeps serving afterwards."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdserve.config import AdmissionConfig, AuthConfig
from pdserve.router.tokenize import PromptTokenizer
from pdserve.v1 import common_pb2 as cpb
from pdserve.v1 import inference_pb2 as ipb
from pdserve.v1 import inference_pb2_grpc
from tests.unit.test_admission_auth import MODEL, Router, start_router, tokenizer  # noqa: F401

EXAMPLES = settings(
    max_examples=120,
    deadline=None,
    # One router serves every example (it keeps no per-request state between them).
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
SERVER_FAULTS = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}

ints = st.one_of(
    st.integers(-5, 300), st.integers(-(2**70), 2**70), st.sampled_from([0, -1, 2**31, 2**64])
)
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(-3, 3))
texts = st.text(max_size=40)
json_values = st.recursive(
    st.none() | st.booleans() | ints | floats | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12,
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "tool", "bogus"])},
        optional={"content": texts | json_values},
    ),
    max_size=3,
)
sampling_fields: dict[str, Any] = {
    "max_tokens": ints | json_values,
    "n": ints,
    "temperature": floats | json_values,
    "top_p": floats,
    "top_k": ints,
    "seed": ints,
    "stop": texts | st.lists(texts, max_size=30) | json_values,
    "stop_token_ids": st.lists(ints, max_size=5),
    "min_tokens": ints,
    "presence_penalty": floats,
    "repetition_penalty": floats,
    "logprobs": ints | st.booleans(),
    "stream": st.booleans(),
    "stream_options": json_values,
    "echo": st.booleans(),
    "return_token_ids": st.booleans(),
    "unknown_field": json_values,
}
completion_bodies = st.fixed_dictionaries(
    {
        "model": st.sampled_from([MODEL, "other"]),
        "prompt": texts | st.lists(ints, max_size=8) | st.lists(texts, max_size=2) | json_values,
    },
    optional=sampling_fields,
)
chat_bodies = st.fixed_dictionaries(
    {"model": st.sampled_from([MODEL, "other"]), "messages": messages | json_values},
    optional={**sampling_fields, "max_completion_tokens": ints, "tools": json_values},
)


@pytest.fixture
async def router(tokenizer: PromptTokenizer) -> AsyncIterator[Router]:  # noqa: F811
    async for r in start_router(tokenizer, AdmissionConfig(), AuthConfig()):
        yield r


async def post(router: Router, path: str, content: bytes) -> int:
    headers = {"content-type": "application/json"}
    r = await router.http.post(path, content=content, headers=headers)
    assert r.status_code < 500, (path, content[:300], r.status_code, r.text[:300])
    if r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.rstrip().endswith("data: [DONE]")
    return r.status_code


@EXAMPLES
@given(body=completion_bodies)
async def test_fuzzed_completions_never_5xx(router: Router, body: dict[str, Any]) -> None:
    await post(router, "/v1/completions", json.dumps(body).encode())


@EXAMPLES
@given(body=chat_bodies)
async def test_fuzzed_chat_never_5xx(router: Router, body: dict[str, Any]) -> None:
    await post(router, "/v1/chat/completions", json.dumps(body).encode())


@EXAMPLES
@given(raw=st.binary(max_size=200))
async def test_fuzzed_bytes_never_5xx(router: Router, raw: bytes) -> None:
    await post(router, "/v1/completions", raw)


def completion(**fields: Any) -> bytes:
    return json.dumps({"model": MODEL, "prompt": "hello", **fields}).encode()


@pytest.mark.parametrize(
    ("content", "status"),
    [
        (completion(max_tokens=0), 400),
        (completion(max_tokens=-5), 400),
        (completion(max_tokens=10**9), 400),
        (completion(n=-1), 400),
        (completion(n=10**6), 400),
        (completion(stop=["x"] * 10_000), 413),  # over the body limit: refused unread
        (completion(stop=["x"] * 100), 400),
        (completion(stop="y" * 1000), 400),
        (completion(seed=2**70), 400),
        (completion(top_k=2**40), 400),
        (completion(stop_token_ids=[-1]), 400),
        (completion(logprobs=5), 400),
        (completion(temperature=float("nan")), 400),
        (completion(prompt="word " * 2000), 413),
        (completion(prompt=[7] * 300), 400),  # longer than the context
        (b'{"model": "toy", "prompt": "\xff\xfe bad utf-8"}', 400),
        (b'{"model": "toy", "prompt": ', 400),
        (b"[]", 400),
    ],
)
async def test_classic_hostile_requests(router: Router, content: bytes, status: int) -> None:
    assert await post(router, "/v1/completions", content) == status
    assert router.worker.requests == []  # refused before any worker was touched
    assert await post(router, "/v1/completions", completion(max_tokens=2)) == 200


async def grpc_generate(router: Router, request: ipb.GenerateRequest) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(router.grpc_target) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        try:
            async for _ in stub.Generate(request, timeout=30):
                pass
        except grpc.aio.AioRpcError as e:
            assert e.code() not in SERVER_FAULTS, (request, e.code(), e.details())
            return e.code()
    return grpc.StatusCode.OK


float32 = st.floats(width=32, allow_nan=True, allow_infinity=True) | st.floats(-3, 3, width=32)
uint32 = st.integers(0, 2**32 - 1)
sampling_messages = st.builds(
    cpb.SamplingParams,
    max_tokens=uint32 | st.integers(0, 8),
    temperature=float32,
    top_p=float32,
    top_k=st.integers(-(2**31), 2**31 - 1),
    seed=st.integers(-(2**63), 2**63 - 1),
    stop=st.lists(st.text(max_size=300), max_size=40),
    stop_token_ids=st.lists(uint32, max_size=300),
    min_tokens=uint32,
    repetition_penalty=float32,
)


@EXAMPLES
@given(
    model=st.sampled_from([MODEL, "", "other"]),
    kind=st.sampled_from(["prompt", "tokens", "chat", "none"]),
    text=st.text(max_size=60),
    tokens=st.lists(uint32, max_size=10),
    sampling=sampling_messages,
)
async def test_fuzzed_grpc_generate_never_internal(
    router: Router,
    model: str,
    kind: str,
    text: str,
    tokens: list[int],
    sampling: cpb.SamplingParams,
) -> None:
    request = ipb.GenerateRequest(model=model, sampling=sampling)
    if kind == "prompt":
        request.prompt = text
    elif kind == "tokens":
        request.tokens.token_ids.extend(tokens)
    elif kind == "chat":
        request.chat.messages.add(role="user", content=text)
    await grpc_generate(router, request)


async def test_grpc_classic_hostile_requests(router: Router) -> None:
    cases = [
        ipb.GenerateRequest(model=MODEL),  # no input
        ipb.GenerateRequest(model=MODEL, prompt="x" * 50_000),  # far beyond the context
        ipb.GenerateRequest(
            model=MODEL, prompt="hi", sampling=cpb.SamplingParams(stop=["s"] * 10_000)
        ),
        ipb.GenerateRequest(
            model=MODEL, prompt="hi", sampling=cpb.SamplingParams(temperature=float("inf"))
        ),
    ]
    for request in cases:
        assert await grpc_generate(router, request) == grpc.StatusCode.INVALID_ARGUMENT
    assert router.worker.requests == []
    ok = ipb.GenerateRequest(model=MODEL, prompt="hi", sampling=cpb.SamplingParams(max_tokens=2))
    assert await grpc_generate(router, ok) == grpc.StatusCode.OK


@EXAMPLES
@given(raw=st.binary(min_size=1, max_size=120))
async def test_fuzzed_protobuf_bytes_are_invalid_argument(router: Router, raw: bytes) -> None:
    """Bytes that are not a GenerateRequest: a clear INVALID_ARGUMENT, never UNKNOWN."""
    async with grpc.aio.insecure_channel(router.grpc_target) as channel:
        call = channel.unary_stream(
            "/pdserve.v1.Inference/Generate",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        try:
            async for _ in call(raw, timeout=30):
                pass
        except grpc.aio.AioRpcError as e:
            assert e.code() not in SERVER_FAULTS, (raw, e.code(), e.details())


@pytest.mark.parametrize("method", ["Generate", "ListModels"])  # streaming and unary
async def test_corrupt_protobuf_is_invalid_argument(router: Router, method: str) -> None:
    async with grpc.aio.insecure_channel(router.grpc_target) as channel:
        make = channel.unary_stream if method == "Generate" else channel.unary_unary
        call = make(
            f"/pdserve.v1.Inference/{method}",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            reply = call(b"\xff\xff\xff\x0f garbage", timeout=30)
            if method == "Generate":
                async for _ in reply:
                    pass
            else:
                await reply
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "malformed request message" in (refused.value.details() or "")
