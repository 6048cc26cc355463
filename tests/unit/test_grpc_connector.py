"""GrpcKvConnector without an engine: vLLM's calls replayed on fake caches and requests.

The scheduler side and several worker-side instances (standing in for engine ranks) talk
over real loopback gRPC, so heterogeneous shapes are checked byte for byte: a PP=2
producer (each stage holds half the layers) feeding a TP=2 consumer (each rank holds one
KV head), and the reverse.
"""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from vllm.distributed import parallel_state
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

from pdserve.kv_transfer.vllm_connector import GrpcConnectorMetadata, GrpcKvConnector

LAYERS, HEADS, HEAD_SIZE, BLOCK, NUM_BLOCKS = 4, 2, 8, 16, 12
PROMPT = 40  # tokens: 3 blocks


def vllm_config(port: int, tp: int, pp: int) -> Any:
    return SimpleNamespace(
        kv_transfer_config=SimpleNamespace(
            kv_connector_extra_config={"host": "127.0.0.1", "port": port, "lease_s": 30},
            is_kv_producer=True,
        ),
        cache_config=SimpleNamespace(block_size=BLOCK),
        parallel_config=SimpleNamespace(world_size=tp * pp),
        model_config=SimpleNamespace(
            get_total_num_kv_heads=lambda: HEADS, get_head_size=lambda: HEAD_SIZE
        ),
    )


def connector(port: int, tp: int, pp: int, role: KVConnectorRole) -> GrpcKvConnector:
    return GrpcKvConnector(vllm_config(port, tp, pp), role, SimpleNamespace())


def rank_caches(layers: range, heads: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        f"model.layers.{i}.self_attn.attn": torch.randn(
            NUM_BLOCKS, heads, BLOCK, 2 * HEAD_SIZE, generator=g
        )
        for i in layers
    }


def worker(
    monkeypatch: pytest.MonkeyPatch,
    port: int,
    tp: tuple[int, int],
    pp: tuple[int, int],
    layers: range,
    seed: int,
) -> GrpcKvConnector:
    """One engine rank: (rank, size) for TP and PP."""
    monkeypatch.setattr(
        parallel_state,
        "get_tp_group",
        lambda: SimpleNamespace(rank_in_group=tp[0], world_size=tp[1]),
    )
    monkeypatch.setattr(
        parallel_state,
        "get_pp_group",
        lambda: SimpleNamespace(rank_in_group=pp[0], world_size=pp[1]),
    )
    c = connector(port, tp[1], pp[1], KVConnectorRole.WORKER)
    c.register_kv_caches(rank_caches(layers, HEADS // tp[1], seed))
    return c


def request(request_id: str, params: dict[str, Any], computed: int = 0) -> Any:
    return SimpleNamespace(
        request_id=request_id,
        prompt_token_ids=list(range(PROMPT)),
        kv_transfer_params=params,
        num_computed_tokens=computed,
    )


class Blocks:
    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def get_block_ids(self) -> tuple[list[int], ...]:
        return (self.ids,)


@pytest.fixture
def base_port() -> Iterator[int]:
    # Below Linux's ephemeral range (32768+), where client sockets could hold a port, and
    # a block of 10 that binds now (the connector's ranks take base, base + 1, ...).
    for _ in range(100):
        base = random.randrange(21000, 22990, 10)
        if all(_bindable(base + i) for i in range(10)):
            yield base
            return
    pytest.fail("no free block of 10 ports in 21000-22999")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def produce(
    ranks: list[GrpcKvConnector], port: int, world: int, block_ids: list[int]
) -> dict[str, Any]:
    """The scheduler side plans the save, every rank copies out, the request finishes."""
    sched = connector(port, 1, world, KVConnectorRole.SCHEDULER)
    sched._kv_cache_manager = SimpleNamespace(get_block_ids=lambda rid: (block_ids,))  # type: ignore[assignment]
    req = request("p-1", {"do_remote_decode": True})
    sched.update_state_after_alloc(req, Blocks(block_ids), 0)  # type: ignore[arg-type]
    # A chunked prefill: the first chunk does not stage, the last one does.
    partial = sched.build_connector_meta(SimpleNamespace(num_scheduled_tokens={"p-1": 16}))
    assert isinstance(partial, GrpcConnectorMetadata) and not partial.saves
    req.num_computed_tokens = 16
    meta = sched.build_connector_meta(SimpleNamespace(num_scheduled_tokens={"p-1": 24}))
    assert isinstance(meta, GrpcConnectorMetadata)
    assert [s.block_ids for s in meta.saves] == [tuple(block_ids)]
    for rank in ranks:
        rank.bind_connector_metadata(meta)
        rank.wait_for_save()
        rank.clear_connector_metadata()
    delay_free, params = sched.request_finished(req, block_ids)  # type: ignore[arg-type]
    assert not delay_free  # the engine's blocks are free at once: the copy is staged
    assert params is not None and params["remote_num_blocks"] == 3
    return params


def consume(
    ranks: list[GrpcKvConnector], port: int, world: int, params: dict[str, Any], local: list[int]
) -> GrpcConnectorMetadata:
    sched = connector(port, world, 1, KVConnectorRole.SCHEDULER)
    decode_params = {"do_remote_prefill": True, **params}
    req = request("d-1", decode_params)
    count, is_async = sched.get_num_new_matched_tokens(req, 0)  # type: ignore[arg-type]
    assert (count, is_async) == (PROMPT - 1, False)
    sched.update_state_after_alloc(req, Blocks(local), count)  # type: ignore[arg-type]
    assert decode_params["do_remote_prefill"] is False  # never loaded twice
    meta = sched.build_connector_meta(SimpleNamespace(num_scheduled_tokens={"d-1": 1}))
    assert isinstance(meta, GrpcConnectorMetadata) and len(meta.loads) == 1
    for rank in ranks:
        rank.bind_connector_metadata(meta)
        rank.start_load_kv(None)  # type: ignore[arg-type]
        rank.clear_connector_metadata()
    return meta


def shutdown(*groups: list[GrpcKvConnector]) -> None:
    for group in groups:
        for c in group:
            c.shutdown()


def test_pp2_producer_to_tp2_consumer(monkeypatch: pytest.MonkeyPatch, base_port: int) -> None:
    p_port, d_port = base_port, base_port + 5
    producers = [
        worker(monkeypatch, p_port, (0, 1), (0, 2), range(0, 2), seed=1),
        worker(monkeypatch, p_port, (0, 1), (1, 2), range(2, 4), seed=2),
    ]
    consumers = [
        worker(monkeypatch, d_port, (0, 2), (0, 1), range(LAYERS), seed=3),
        worker(monkeypatch, d_port, (1, 2), (0, 1), range(LAYERS), seed=4),
    ]
    try:
        src_blocks, dst_blocks = [5, 2, 7], [1, 4, 9]
        params = produce(producers, p_port, 2, src_blocks)
        assert params["remote_ranks"] == 2
        consume(consumers, d_port, 2, params, dst_blocks)
        for tp_rank, c in enumerate(consumers):
            assert not c.get_block_ids_with_load_errors()
            for layer in range(LAYERS):
                stage = producers[layer // 2]
                want = stage._kv[layer][src_blocks, tp_rank : tp_rank + 1]
                assert torch.equal(c._kv[layer][dst_blocks], want), (tp_rank, layer)
        # Both consumer ranks confirmed their head of every layer: nothing stays staged.
        for p in producers:
            assert p._server is not None and p._server.staging.totals() == (0, 0, 0)
    finally:
        shutdown(producers, consumers)


def test_tp2_producer_to_pp2_consumer(monkeypatch: pytest.MonkeyPatch, base_port: int) -> None:
    p_port, d_port = base_port, base_port + 5
    producers = [
        worker(monkeypatch, p_port, (0, 2), (0, 1), range(LAYERS), seed=5),
        worker(monkeypatch, p_port, (1, 2), (0, 1), range(LAYERS), seed=6),
    ]
    consumers = [
        worker(monkeypatch, d_port, (0, 1), (0, 2), range(0, 2), seed=7),
        worker(monkeypatch, d_port, (0, 1), (1, 2), range(2, 4), seed=8),
    ]
    try:
        src_blocks, dst_blocks = [0, 11, 3], [8, 6, 2]
        params = produce(producers, p_port, 2, src_blocks)
        consume(consumers, d_port, 1, params, dst_blocks)
        for c in consumers:
            assert not c.get_block_ids_with_load_errors()
            for layer in c._kv:
                merged = torch.cat([p._kv[layer][src_blocks] for p in producers], dim=1)
                assert torch.equal(c._kv[layer][dst_blocks], merged), layer
        for p in producers:
            assert p._server is not None and p._server.staging.totals() == (0, 0, 0)
    finally:
        shutdown(producers, consumers)


def test_corrupted_load_reports_invalid_blocks(
    monkeypatch: pytest.MonkeyPatch, base_port: int
) -> None:
    p_port, d_port = base_port, base_port + 5
    producers = [worker(monkeypatch, p_port, (0, 1), (0, 1), range(LAYERS), seed=9)]
    consumers = [worker(monkeypatch, d_port, (0, 1), (0, 1), range(LAYERS), seed=10)]
    try:
        before = {k: v.clone() for k, v in consumers[0]._kv.items()}
        params = produce(producers, p_port, 1, [1, 2, 3])
        assert producers[0]._server is not None
        producers[0]._server.service._corrupt_next = 1  # the InjectFault hook, in-process
        dst_blocks = [4, 5, 6]
        consume(consumers, d_port, 1, params, dst_blocks)
        # vLLM gets the blocks as invalid (and fails the request); none were written.
        assert consumers[0].get_block_ids_with_load_errors() == set(dst_blocks)
        assert consumers[0].get_block_ids_with_load_errors() == set()  # reported once
        for layer, tensor in consumers[0]._kv.items():
            assert torch.equal(tensor, before[layer])
        assert consumers[0]._server is not None
        assert consumers[0]._server.stats.failures["checksum"] == 1
        # Unconfirmed, the staged copy waits for a retry or its lease.
        assert producers[0]._server.staging.totals()[0] == 1
    finally:
        shutdown(producers, consumers)


def test_a_local_prefix_hit_releases_the_staged_copy(
    monkeypatch: pytest.MonkeyPatch, base_port: int
) -> None:
    p_port = base_port
    producers = [worker(monkeypatch, p_port, (0, 1), (0, 1), range(LAYERS), seed=11)]
    try:
        params = produce(producers, p_port, 1, [7, 8, 9])
        sched = connector(p_port + 5, 1, 1, KVConnectorRole.SCHEDULER)
        req = request("d-2", {"do_remote_prefill": True, **params})
        # The decode engine's own prefix cache already holds the prompt (but its last token).
        assert sched.get_num_new_matched_tokens(req, PROMPT - 1)[0] == 0  # type: ignore[arg-type]
        assert producers[0]._server is not None
        staging = producers[0]._server.staging
        deadline = time.monotonic() + 10
        while staging.totals() != (0, 0, 0) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert staging.totals() == (0, 0, 0)
    finally:
        shutdown(producers)
