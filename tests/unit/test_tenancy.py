"""Per-tenant prefix-cache isolation: salts per tenant, salted block hashes equal to
vLLM's, routing that follows the tenant's cached blocks, and the salt on the wire."""

from __future__ import annotations

import pytest

from pdserve.router.kv_index.hashing import BlockHasher
from pdserve.router.kv_index.lookup import PromptBlocks, RoutedPrefixLookup
from pdserve.router.tenancy import TENANT_HEADER, CacheSalter
from pdserve.v1 import common_pb2 as cpb
from pdserve.v1 import worker_pb2 as pb
from tests.unit.fake_worker import FakeWorker, fake_router

PROMPT = list(range(2000, 2070))  # 4 full blocks of 16, 6 tokens left over
BY_KEY = CacheSalter(enabled=True, by_api_key=True)
BY_HEADER = CacheSalter(enabled=True, by_api_key=False)


def test_salts_separate_tenants_and_agree_within_one() -> None:
    alice, bob = BY_KEY.salt("Bearer key-a", None), BY_KEY.salt("Bearer key-b", None)
    assert alice and bob and alice != bob
    assert BY_KEY.salt("bearer  key-a ", None) == alice  # same key, same cache
    # With API keys the tenant header cannot move a client into another tenant's cache.
    assert BY_KEY.salt("Bearer key-a", "bob") == alice
    assert BY_KEY.salt(None, "bob") is None
    # The salt is not the key, nor its plain SHA-256 (router/auth.py's digest).
    assert "key-a" not in alice
    # Without keys: the gateway-set tenant header; none -> the shared, unsalted cache.
    assert BY_HEADER.salt(None, "team-1") == BY_HEADER.salt("Bearer x", "team-1")
    assert BY_HEADER.salt(None, "team-1") != BY_HEADER.salt(None, "team-2")
    assert BY_HEADER.salt(None, None) is None and BY_HEADER.salt(None, "  ") is None
    # Off (the default): nobody is salted.
    off = CacheSalter(enabled=False, by_api_key=True)
    assert off.salt("Bearer key-a", "t") is None
    assert off.salt_from_metadata([("authorization", "Bearer key-a")]) is None
    # gRPC metadata reads the same way.
    assert BY_KEY.salt_from_metadata([("authorization", "Bearer key-a")]) == alice
    assert BY_HEADER.salt_from_metadata([(TENANT_HEADER, "team-1")]) == BY_HEADER.salt(
        None, "team-1"
    )


def test_two_tenants_with_one_prompt_get_different_block_hashes() -> None:
    hasher = BlockHasher(16, "vllm-sha256_cbor")
    alice, bob = BY_HEADER.salt(None, "alice"), BY_HEADER.salt(None, "bob")
    plain = hasher.block_hashes(PROMPT)
    a1, a2 = hasher.block_hashes(PROMPT, alice), hasher.block_hashes(PROMPT, alice)
    b = hasher.block_hashes(PROMPT, bob)
    assert len(plain) == len(a1) == len(b) == 4
    assert a1 == a2  # same tenant: equal hashes (its own cache hits)
    # Different tenants (and the unsalted cache) share no block, not even the later ones.
    assert not set(a1) & set(b) and not set(a1) & set(plain) and not set(b) & set(plain)
    # The per-hasher memo keeps tenants apart too (the first block's key has the salt).
    assert hasher.block_hashes(PROMPT) == plain


@pytest.mark.parametrize("algorithm", ["sha256_cbor", "sha256"])
def test_salted_hashes_equal_vllms(algorithm: str) -> None:
    """The router's salted hashes are the values vLLM computes (and publishes in its KV
    events) for a request with that cache_salt, so kv_aware routing matches them."""
    from vllm import SamplingParams
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core import kv_cache_utils as kcu
    from vllm.v1.request import Request

    fn = get_hash_fn_by_name(algorithm)
    kcu.init_none_hash(fn)
    salt = BY_KEY.salt("Bearer key-a", None)
    request = Request(
        "r1",
        PROMPT,
        SamplingParams(max_tokens=1),
        None,
        cache_salt=salt,
        block_hasher=kcu.get_request_block_hasher(16, fn),
    )
    expected = [kcu.maybe_convert_block_hash(h) for h in request.block_hashes]
    assert len(expected) == 4
    assert BlockHasher(16, f"vllm-{algorithm}").block_hashes(PROMPT, salt) == expected


def test_prefix_lookup_finds_only_the_tenants_own_blocks() -> None:
    lookup = RoutedPrefixLookup(block_size=16)
    alice, bob = BY_HEADER.salt(None, "alice"), BY_HEADER.salt(None, "bob")
    lookup.observe("w1", PromptBlocks(PROMPT, alice))
    assert lookup.matched_tokens(PromptBlocks(PROMPT, alice)) == {"w1": 64}
    assert lookup.matched_tokens(PromptBlocks(PROMPT, bob)) == {}
    assert lookup.matched_tokens(PromptBlocks(PROMPT)) == {}


async def test_router_sends_each_tenants_salt_to_every_stage() -> None:
    """Through the router's generation path: prefill and decode requests carry the
    tenant's salt (the engines salt their caches with it), and no salt without a tenant."""
    from pdserve.router.service import GenerateCall

    prefill, decode = FakeWorker(pb.ROLE_PREFILL, "m"), FakeWorker(pb.ROLE_DECODE, "m")
    async with fake_router(prefill, decode, "m") as router:
        router.service.tenancy = BY_HEADER
        for i, tenant in enumerate(("alice", "bob", None)):
            salt = router.service.tenancy.salt(None, tenant)
            call = GenerateCall(
                f"r{i}", PROMPT, cpb.SamplingParams(max_tokens=2), 0.0, cache_salt=salt
            )
            _ = [d async for d in router.service.generate(call)]
    salts = [r.cache_salt for r in prefill.requests]
    assert salts == [r.cache_salt for r in decode.requests]
    assert salts[0] and salts[1] and salts[0] != salts[1] and salts[2] == ""
    assert salts[0] == BY_HEADER.salt(None, "alice")


async def test_worker_hands_the_salt_to_its_engine() -> None:
    from tests.unit.test_worker_tracing import FakeEngine, _request, _serve

    engine = FakeEngine()
    async with _serve(engine) as (stub, _, _):
        request = _request(pb.STAGE_FULL)
        _ = [m async for m in stub.Generate(request)]
        request.cache_salt = "abc123"
        _ = [m async for m in stub.Generate(request)]
    assert engine.salts == [None, "abc123"]


async def test_http_and_grpc_requests_carry_their_api_keys_salt() -> None:
    """With API keys and isolation on, the router derives the salt from the key each
    request authenticated with, on both client APIs; equal keys, equal salts."""
    import grpc
    import httpx
    from prometheus_client import CollectorRegistry

    from pdserve.config import AuthConfig, Role
    from pdserve.metrics import RouterMetrics
    from pdserve.models import resolve_model
    from pdserve.router.api.grpc import InferenceServicer
    from pdserve.router.api.http import build_http_app
    from pdserve.router.auth import ApiKeys
    from pdserve.router.grpc_guard import router_interceptors
    from pdserve.router.planner import Planner
    from pdserve.router.scheduling.policy import make_policy
    from pdserve.router.service import GenerationService
    from pdserve.router.tokenize import PromptTokenizer
    from pdserve.router.workers import WorkerPool
    from pdserve.v1 import inference_pb2 as ipb
    from pdserve.v1 import inference_pb2_grpc
    from tests.unit.fake_lm import MAX_MODEL_LEN, ToyWorker, serve_toy

    worker = ToyWorker(pb.ROLE_DECODE, "toy")
    worker_server, address = await serve_toy(worker)
    pool = WorkerPool("toy", rpc_timeout_s=2, poll_interval_s=60)
    pool.add([address], Role.DECODE)
    await pool.poll_once()
    metrics = RouterMetrics(CollectorRegistry())
    planner = Planner(pool, make_policy("round_robin"), make_policy("least_load"))
    service = GenerationService(
        "toy", pool, planner, metrics, MAX_MODEL_LEN, tenancy=CacheSalter(True, by_api_key=True)
    )
    keys = ApiKeys(AuthConfig(api_keys=("key-a", "key-b")), metrics)
    tokenizer = PromptTokenizer(str(resolve_model("tiny")))
    app = build_http_app(service, tokenizer, metrics.registry, planner.can_serve, 4096)
    app.middleware("http")(keys.http_middleware())
    grpc_server = grpc.aio.server(interceptors=router_interceptors(keys))
    inference_pb2_grpc.add_InferenceServicer_to_server(
        InferenceServicer(service, tokenizer), grpc_server
    )
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    body = {"model": "toy", "prompt": "hello", "max_tokens": 2}
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as http:
            for key in ("key-a", "key-b", "key-a"):
                headers = {"Authorization": f"Bearer {key}", TENANT_HEADER: "ignored"}
                reply = await http.post("/v1/completions", json=body, headers=headers)
                assert reply.status_code == 200, reply.text
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            request = ipb.GenerateRequest(model="toy", prompt="hello")
            request.sampling.max_tokens = 2
            stub = inference_pb2_grpc.InferenceStub(channel)
            metadata = [("authorization", "Bearer key-b")]
            _ = [m async for m in stub.Generate(request, metadata=metadata)]
    finally:
        await grpc_server.stop(None)
        await pool.close()
        await worker_server.stop(None)
    a, b = BY_KEY.salt("Bearer key-a", None), BY_KEY.salt("Bearer key-b", None)
    assert [r.cache_salt for r in worker.requests] == [a, b, a, b]
