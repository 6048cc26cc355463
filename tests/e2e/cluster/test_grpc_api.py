"""The gRPC client API with the generated client, plus standard health and reflection."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pdserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from tests.e2e.conftest import Cluster, Reference
from tests.e2e.prompts import CHAT_CASES, CHAT_MAX_TOKENS, COMPLETION_CASES, SERVED_NAME

pytestmark = pytest.mark.e2e


def _collect(
    stub: inference_pb2_grpc.InferenceStub, request: inference_pb2.GenerateRequest
) -> tuple[str, list[int], int, common_pb2.Usage]:
    text, ids, finish, usage = "", [], 0, common_pb2.Usage()
    for msg in stub.Generate(request, timeout=120):
        text += msg.text
        ids += msg.token_ids
        if msg.finish_reason:
            finish = msg.finish_reason
        if msg.HasField("usage"):
            usage = msg.usage
    return text, ids, finish, usage


def _finish(name: str) -> int:
    return {"stop": common_pb2.FINISH_REASON_STOP, "length": common_pb2.FINISH_REASON_LENGTH}[name]


def test_generate_prompt_matches_plain_vllm(cluster: Cluster, reference: Reference) -> None:
    with grpc.insecure_channel(cluster.grpc) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        for (prompt, max_tokens), expected in zip(
            COMPLETION_CASES, reference.completions, strict=True
        ):
            request = inference_pb2.GenerateRequest(
                model=SERVED_NAME,
                prompt=prompt,
                sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0),
            )
            text, ids, finish, usage = _collect(stub, request)
            assert (text, ids) == (expected.text, expected.token_ids)
            assert finish == _finish(expected.finish_reason)
            assert usage.completion_tokens == len(ids)


def test_generate_chat_and_tokens(cluster: Cluster, reference: Reference) -> None:
    with grpc.insecure_channel(cluster.grpc) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        chat = inference_pb2.ChatInput(
            messages=[inference_pb2.ChatMessage(**m) for m in CHAT_CASES[2]]
        )
        request = inference_pb2.GenerateRequest(
            model=SERVED_NAME,
            chat=chat,
            sampling=common_pb2.SamplingParams(max_tokens=CHAT_MAX_TOKENS, temperature=0),
        )
        text, ids, _, _ = _collect(stub, request)
        assert (text, ids) == (reference.chats[2].text, reference.chats[2].token_ids)

        # Pre-tokenized input: the prompt and generated ids of a case, continued.
        expected = reference.completions[3]
        request = inference_pb2.GenerateRequest(
            model=SERVED_NAME,
            tokens=inference_pb2.TokenInput(token_ids=[5, 17, 33, 2, 90]),
            sampling=common_pb2.SamplingParams(max_tokens=6, temperature=0),
        )
        first = _collect(stub, request)
        assert first == _collect(stub, request)  # deterministic across disaggregated runs
        assert len(first[1]) == 6 or first[2] == common_pb2.FINISH_REASON_STOP
        assert expected.token_ids  # reference sanity


def test_list_models_health_and_reflection(cluster: Cluster) -> None:
    with grpc.insecure_channel(cluster.grpc) as channel:
        models = inference_pb2_grpc.InferenceStub(channel).ListModels(
            inference_pb2.ListModelsRequest(), timeout=10
        )
        assert [m.id for m in models.models] == [SERVED_NAME]
        assert models.models[0].max_model_len > 0

        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "pdserve.v1.Inference"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = list(
            stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
            )
        )
        names = {s.name for s in replies[0].list_services_response.service}
        assert {"pdserve.v1.Inference", "grpc.health.v1.Health"} <= names
        # Reflection serves the descriptors a grpcurl-style client needs.
        replies = list(
            stub.ServerReflectionInfo(
                iter(
                    [
                        reflection_pb2.ServerReflectionRequest(
                            file_containing_symbol="pdserve.v1.Inference"
                        )
                    ]
                ),
                timeout=10,
            )
        )
        assert replies[0].file_descriptor_response.file_descriptor_proto


def test_grpc_errors_have_clear_codes(cluster: Cluster) -> None:
    with grpc.insecure_channel(cluster.grpc) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        cases = [
            (inference_pb2.GenerateRequest(model="nope", prompt="x"), grpc.StatusCode.NOT_FOUND),
            (inference_pb2.GenerateRequest(model=SERVED_NAME), grpc.StatusCode.INVALID_ARGUMENT),
            (
                inference_pb2.GenerateRequest(
                    model=SERVED_NAME,
                    prompt="x",
                    sampling=common_pb2.SamplingParams(max_tokens=10**6),
                ),
                grpc.StatusCode.INVALID_ARGUMENT,
            ),
            (
                inference_pb2.GenerateRequest(
                    model=SERVED_NAME, tokens=inference_pb2.TokenInput(token_ids=[10**6])
                ),
                grpc.StatusCode.INVALID_ARGUMENT,
            ),
        ]
        for request, code in cases:
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Generate(request, timeout=30))
            assert info.value.code() == code, info.value.details()
            assert info.value.details()
