"""The prefix index: block hashes equal to vLLM's, index updates and matching, and the
KV event subscriber against vLLM's own ZMQ publisher (synthetic event streams)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import zmq.asyncio
from prometheus_client import CollectorRegistry

from pdserve.errors import ConfigError
from pdserve.metrics import RoutingMetrics
from pdserve.router.kv_index.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    encode_batch,
)
from pdserve.router.kv_index.hashing import BlockHasher
from pdserve.router.kv_index.index import PrefixIndex
from pdserve.router.kv_index.lookup import PromptBlocks, RoutedPrefixLookup
from pdserve.router.kv_index.subscriber import EventSource, KvEventSubscriber

TOKENS = list(range(1000, 1070))  # 4 full blocks of 16, 6 tokens left over


@pytest.mark.parametrize("algorithm", ["sha256_cbor", "sha256"])
def test_block_hashes_equal_vllms(algorithm: str) -> None:
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core import kv_cache_utils as kcu

    fn = get_hash_fn_by_name(algorithm)
    kcu.init_none_hash(fn)
    parent, expected = None, []
    for start in range(0, 64, 16):
        parent = kcu.hash_block_tokens(fn, parent, TOKENS[start : start + 16], None)
        expected.append(kcu.maybe_convert_block_hash(parent))
    hasher = BlockHasher(16, f"vllm-{algorithm}")
    assert hasher.block_hashes(TOKENS) == expected
    assert hasher.first_block_hash(TOKENS[:16]) == expected[0]


def test_hashes_chain_and_skip_partial_blocks() -> None:
    hasher = BlockHasher(16, "sha256_cbor")
    assert hasher.block_hashes(TOKENS[:15]) == []
    a = hasher.block_hashes(TOKENS)
    b = hasher.block_hashes([7, *TOKENS[1:]])
    assert len(a) == 4 and all(x != y for x, y in zip(a, b, strict=True))  # chained
    assert hasher.block_hashes(TOKENS[:40]) == a[:2]


def test_unreproducible_algorithm_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="xxhash"):
        BlockHasher(16, "vllm-xxhash")


def test_index_match_counts_leading_blocks_per_worker() -> None:
    index = PrefixIndex()
    index.store("a", [1, 2, 3])
    index.store("b", [1, 2])
    index.store("c", [2, 3])  # holds later blocks but not the first: no prefix
    assert index.match([1, 2, 3, 4]) == {"a": 3, "b": 2}
    assert index.match([9, 1]) == {}
    assert index.size == 3


def test_index_removals_clears_and_leaving_workers() -> None:
    index = PrefixIndex()
    index.apply("a", [BlockStored([1, 2, 3], None, [], 16, "GPU")])
    index.apply("b", [BlockStored([1, 2], None, [], 16, "GPU")])
    index.apply("a", [BlockRemoved([2], "GPU")])
    assert index.match([1, 2, 3]) == {"a": 1, "b": 2}
    index.apply("b", [AllBlocksCleared()])
    assert index.match([1]) == {"a": 1}
    index.drop_worker("a")
    assert index.match([1]) == {} and index.size == 0 and index.workers == ["b"]


def test_index_ignores_other_media_and_groups() -> None:
    index = PrefixIndex()
    index.apply("a", [BlockStored([1], None, [], 16, "CPU")])
    index.apply("a", [BlockStored([2], None, [], 16, "GPU", group_idx=1)])
    assert index.size == 0


def test_approximate_index_forgets_least_recently_routed() -> None:
    index = PrefixIndex(capacity_blocks=3)
    index.record("a", [1, 2])
    index.record("a", [3])
    index.record("a", [1])  # 1 is used again: 2 is now the oldest
    index.record("a", [4])
    assert not index.holds("a", 2)
    assert all(index.holds("a", h) for h in (1, 3, 4))
    assert index.blocks_of("a") == 3


def test_routed_lookup_learns_from_routing() -> None:
    lookup = RoutedPrefixLookup(block_size=16)
    prompt = PromptBlocks(TOKENS)
    assert lookup.matched_tokens(prompt) == {}
    lookup.observe("w1", prompt)
    assert lookup.matched_tokens(PromptBlocks(TOKENS[:50])) == {"w1": 48}


# --- the subscriber against vLLM's real publisher ------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Publisher:
    """vLLM's ZmqEventPublisher, fed with vLLM's own event types."""

    def __init__(self, buffer_steps: int = 100) -> None:
        from vllm.distributed.kv_events import ZmqEventPublisher

        port, replay = _free_port(), _free_port()
        self.source = EventSource(f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{replay}")
        self.pub = ZmqEventPublisher(
            0, f"tcp://*:{port}", f"tcp://127.0.0.1:{replay}", buffer_steps=buffer_steps
        )

    def store(self, *hashes: int, parent: int | None = None) -> None:
        from vllm.distributed.kv_events import BlockStored as VBlockStored
        from vllm.distributed.kv_events import KVEventBatch

        event = VBlockStored(
            block_hashes=list(hashes),
            parent_block_hash=parent,
            token_ids=[0] * (16 * len(hashes)),
            block_size=16,
            lora_id=None,
            medium="GPU",
            lora_name=None,
        )
        self.pub.publish(KVEventBatch(ts=time.time(), events=[event]))

    def remove(self, *hashes: int) -> None:
        from vllm.distributed.kv_events import BlockRemoved as VBlockRemoved
        from vllm.distributed.kv_events import KVEventBatch

        event = VBlockRemoved(block_hashes=list(hashes), medium="GPU")
        self.pub.publish(KVEventBatch(ts=time.time(), events=[event]))


@pytest.fixture
def publisher() -> Iterator[Publisher]:
    p = Publisher()
    yield p
    p.pub.shutdown()


@pytest.fixture
async def context() -> AsyncIterator[zmq.asyncio.Context]:
    ctx = zmq.asyncio.Context()
    yield ctx
    ctx.destroy(linger=0)


def _metrics() -> RoutingMetrics:
    return RoutingMetrics(CollectorRegistry())


async def _until(condition: object, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def test_joining_subscriber_replays_what_it_missed(
    publisher: Publisher, context: zmq.asyncio.Context
) -> None:
    # Published before anyone subscribed: PUB/SUB drops these; the replay must fill them.
    publisher.store(1, 2)
    publisher.store(3, parent=2)
    publisher.remove(1)
    await asyncio.sleep(0.3)
    index, metrics = PrefixIndex(), _metrics()
    sub = KvEventSubscriber("w", publisher.source, index, metrics, context=context)
    task = asyncio.create_task(sub.run())
    try:
        await asyncio.sleep(0.3)  # let the SUB socket connect
        publisher.store(9)  # the first live batch (seq 3) triggers the join resync
        await _until(lambda: sub.next_seq == 4)
        assert sorted(h for h in (1, 2, 3, 9) if index.holds("w", h)) == [2, 3, 9]
        assert metrics.event_resyncs.labels("join")._value.get() == 1
        assert metrics.event_resyncs.labels("replay_failed")._value.get() == 0
    finally:
        task.cancel()


async def test_gap_is_filled_from_replay(
    publisher: Publisher, context: zmq.asyncio.Context
) -> None:
    index, metrics = PrefixIndex(), _metrics()
    sub = KvEventSubscriber("w", publisher.source, index, metrics, context=context)
    for h in (10, 11, 12):
        publisher.store(h)
    await asyncio.sleep(0.3)
    batch0 = encode_batch(EventBatch(time.time(), [BlockStored([10], None, [], 16, "GPU")]))
    batch2 = encode_batch(EventBatch(time.time(), [BlockStored([12], None, [], 16, "GPU")]))
    sub.next_seq = 0
    await sub.handle(0, batch0)
    await sub.handle(2, batch2)  # seq 1 was lost on the way
    assert sub.next_seq == 3
    assert all(index.holds("w", h) for h in (10, 11, 12))
    assert metrics.event_resyncs.labels("gap")._value.get() == 1
    await sub.handle(1, batch0)  # a duplicate is ignored
    assert sub.next_seq == 3


async def test_unreplayable_gap_clears_the_worker(context: zmq.asyncio.Context) -> None:
    index, metrics = PrefixIndex(), _metrics()
    index.store("w", [77])  # known before the gap; may have been removed in it
    # No replay endpoint: nothing can fill the gap.
    source = EventSource("tcp://127.0.0.1:1")
    sub = KvEventSubscriber("w", source, index, metrics, context=context)
    sub.next_seq = 5
    live = encode_batch(EventBatch(time.time(), [BlockStored([78], None, [], 16, "GPU")]))
    await sub.handle(8, live)
    assert not index.holds("w", 77) and index.holds("w", 78)
    assert sub.next_seq == 9
    assert metrics.event_resyncs.labels("replay_failed")._value.get() == 1


async def test_restarted_publisher_clears_the_worker(context: zmq.asyncio.Context) -> None:
    index, metrics = PrefixIndex(), _metrics()
    sub = KvEventSubscriber("w", EventSource("tcp://127.0.0.1:1"), index, metrics, context=context)
    sub.next_seq = 0
    for seq in range(3):
        batch = EventBatch(time.time(), [BlockStored([seq + 1], None, [], 16, "GPU")])
        await sub.handle(seq, encode_batch(batch))
    fresh = encode_batch(EventBatch(time.time(), [BlockStored([50], None, [], 16, "GPU")]))
    await sub.handle(0, fresh)
    assert [h for h in (1, 2, 3, 50) if index.holds("w", h)] == [50]
    assert metrics.event_resyncs.labels("restart")._value.get() == 1


async def test_hash_mismatch_is_counted(context: zmq.asyncio.Context) -> None:
    index, metrics = PrefixIndex(), _metrics()
    hasher = BlockHasher(16, "sha256_cbor")
    sub = KvEventSubscriber("w", EventSource("tcp://127.0.0.1:1"), index, metrics, hasher, context)
    sub.next_seq = 0
    tokens = TOKENS[:16]
    good = BlockStored([hasher.first_block_hash(tokens)], None, tokens, 16, "GPU")
    bad = BlockStored([12345], None, tokens, 16, "GPU")
    await sub.handle(0, encode_batch(EventBatch(time.time(), [good])))
    assert metrics.hash_mismatches._value.get() == 0
    await sub.handle(1, encode_batch(EventBatch(time.time(), [bad])))
    assert metrics.hash_mismatches._value.get() == 1
