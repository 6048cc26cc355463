"""The grpc KV transport end to end: exact tokens, integrity, leases, layout refusal.

The fault test runs first, on a prompt the decode worker has never seen (its own prefix
cache would otherwise supply the KV and no transfer would happen).
"""

from __future__ import annotations

import time

import grpc
import httpx
import pytest

from pdserve.kv_transfer.metadata import KV_HANDLE_FORMAT_VERSION
from pdserve.kv_transfer.shm import SHM_DIR, SharedBuffer
from pdserve.v1 import common_pb2 as cpb
from pdserve.v1 import kv_transfer_pb2 as kvpb
from pdserve.v1 import kv_transfer_pb2_grpc as kvgrpc
from pdserve.v1 import worker_pb2 as wpb
from pdserve.v1 import worker_pb2_grpc as wgrpc
from tests.e2e.conftest import Cluster, Reference, chat_answer, completion_answer
from tests.e2e.grpc_kv.conftest import DECODE_WORKER, LEASE_S, PREFILL_KV, PREFILL_WORKER
from tests.e2e.prompts import CHAT_CASES, COMPLETION_CASES

pytestmark = pytest.mark.e2e

LONG_CASE = 14  # a long prompt: several KV blocks


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not (line.startswith(name + "{") or line.startswith(name + " ")):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def dev_shm_has_room() -> bool:
    """Whether workers here can stage KV in /dev/shm (a small container /dev/shm cannot:
    they then fall back to private memory and the socket, which the tests check instead)."""
    try:
        SharedBuffer(1 << 20).release()
    except OSError:
        return False
    return True


def scrape(cluster: Cluster, worker: str) -> str:
    return httpx.get(f"http://127.0.0.1:{cluster.metrics_ports[worker]}/metrics", timeout=10).text


def test_corrupted_chunk_is_detected_and_no_wrong_tokens_reach_the_client(
    grpc_cluster: Cluster, reference: Reference
) -> None:
    before = scrape(grpc_cluster, "decode-0")
    stub = kvgrpc.KvTransferStub(grpc.insecure_channel(PREFILL_KV))
    stub.InjectFault(kvpb.InjectFaultRequest(corrupt_next_chunks=1), timeout=10)
    prompt, max_tokens = COMPLETION_CASES[LONG_CASE]
    answer = completion_answer(grpc_cluster.openai(), prompt, max_tokens)
    after = scrape(grpc_cluster, "decode-0")
    name = "pdserve_kv_transfer_failures_total"
    assert metric(after, name, reason="checksum") == metric(before, name, reason="checksum") + 1
    # The router retried (or fell back to colocated): the client saw exactly the tokens
    # of a plain vLLM engine, never tokens computed over the corrupted KV.
    assert answer.token_ids == reference.completions[LONG_CASE].token_ids


def test_tokens_identical_to_plain_vllm(grpc_cluster: Cluster, reference: Reference) -> None:
    before = scrape(grpc_cluster, "decode-0")
    client = grpc_cluster.openai()
    for i, (prompt, max_tokens) in enumerate(COMPLETION_CASES):
        if i == LONG_CASE:
            continue  # served by the fault test; the decode worker has it cached now
        got = completion_answer(client, prompt, max_tokens)
        assert got.token_ids == reference.completions[i].token_ids, (i, prompt[:40])
    for i, messages in enumerate(CHAT_CASES):
        assert chat_answer(client, messages).token_ids == reference.chats[i].token_ids, i
    after = scrape(grpc_cluster, "decode-0")
    # The prompts really came over the gRPC stream: bytes arrived, and the decode engine
    # counted them as external KV instead of computing them.
    received = metric(after, "pdserve_kv_transfer_bytes_received_total") - metric(
        before, "pdserve_kv_transfer_bytes_received_total"
    )
    source = "vllm:prompt_tokens_by_source_total"
    external = metric(after, source, source="external_kv_transfer") - metric(
        before, source, source="external_kv_transfer"
    )
    assert received > 0
    # Same host: all of it was read from the prefill worker's /dev/shm (ADR 0015).
    shm_received = metric(after, "pdserve_kv_transfer_shm_bytes_received_total") - metric(
        before, "pdserve_kv_transfer_shm_bytes_received_total"
    )
    assert shm_received == (received if dev_shm_has_room() else 0)
    assert external >= 1000, external
    assert metric(after, "pdserve_kv_transfer_failures_total") == metric(
        before, "pdserve_kv_transfer_failures_total"
    )


def _prefill_only(prompt_ids: list[int], request_id: str) -> wpb.KvHandle:
    """A prefill whose decode never comes (as if the decode worker died after prefill)."""
    stub = wgrpc.WorkerStub(grpc.insecure_channel(PREFILL_WORKER))
    request = wpb.WorkerGenerateRequest(
        request_id=request_id,
        prompt_token_ids=prompt_ids,
        sampling=cpb.SamplingParams(max_tokens=1),
        stage=wpb.STAGE_PREFILL,
    )
    replies = list(stub.Generate(request, timeout=60))
    assert replies[-1].HasField("kv_handle")
    return replies[-1].kv_handle


def test_staged_kv_is_freed_when_the_lease_runs_out(grpc_cluster: Cluster) -> None:
    expired_before = metric(
        scrape(grpc_cluster, "prefill-0"), "pdserve_kv_transfer_lease_expirations_total"
    )
    files_before = set(SHM_DIR.glob("pdserve-kv-*"))
    handle = _prefill_only(list(range(30, 330)), "lease-test")
    text = scrape(grpc_cluster, "prefill-0")
    staged = metric(text, "pdserve_kv_transfer_staged_blocks")
    assert staged >= len(handle.block_ids) > 0
    # Staged in /dev/shm (same-host workers, ADR 0015), and unlinked with the lease below.
    staged_files = set(SHM_DIR.glob("pdserve-kv-*")) - files_before
    assert bool(staged_files) == dev_shm_has_room()
    started = time.monotonic()
    while time.monotonic() - started < LEASE_S + 5:
        text = scrape(grpc_cluster, "prefill-0")
        if metric(text, "pdserve_kv_transfer_staged_blocks") == 0:
            break
        time.sleep(0.5)
    assert metric(text, "pdserve_kv_transfer_staged_blocks") == 0
    assert metric(text, "pdserve_kv_transfer_staged_requests") == 0
    assert not any(path.exists() for path in staged_files)
    # >=: the fault test's unconfirmed copy may expire in the same window.
    assert metric(text, "pdserve_kv_transfer_lease_expirations_total") >= expired_before + 1
    # The engine's own KV usage is back at its baseline (nothing running: zero).
    assert metric(text, "vllm:kv_cache_usage_perc") == 0


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("block_size", 64, "block_size: producer=64"),
        ("dtype", "bfloat16", "dtype: producer='bfloat16'"),
    ],
)
def test_mismatched_layout_is_refused_before_any_byte_moves(
    grpc_cluster: Cluster, field: str, value: object, message: str
) -> None:
    prompt = list(range(40, 140))
    handle = _prefill_only(prompt, f"mismatch-{field}")
    assert handle.format_version == KV_HANDLE_FORMAT_VERSION
    setattr(handle, field, value)  # a producer whose engine differs from the consumer's
    before = scrape(grpc_cluster, "decode-0")
    stub = wgrpc.WorkerStub(grpc.insecure_channel(DECODE_WORKER))
    request = wpb.WorkerGenerateRequest(
        request_id=f"mismatch-decode-{field}",
        prompt_token_ids=prompt,
        sampling=cpb.SamplingParams(max_tokens=4),
        stage=wpb.STAGE_DECODE,
        kv_handle=handle,
    )
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(request, timeout=60))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert message in (info.value.details() or "")
    after = scrape(grpc_cluster, "decode-0")
    name = "pdserve_worker_kv_incompatible_total"
    assert metric(after, name) == metric(before, name) + 1
    received = "pdserve_kv_transfer_bytes_received_total"
    assert metric(after, received) == metric(before, received)
