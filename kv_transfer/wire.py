"""KvHandle <-> protobuf. The only place that knows the wire form of a handle."""

from __future__ import annotations

from pdserve.kv_transfer.base import KvHandle
from pdserve.kv_transfer.metadata import KvLayout
from pdserve.v1 import worker_pb2 as pb


def layout_to_proto(layout: KvLayout, out: pb.KvHandle) -> pb.KvHandle:
    out.model_id = layout.model_id
    out.dtype = layout.dtype
    out.block_size = layout.block_size
    out.num_layers = layout.num_layers
    out.num_kv_heads = layout.num_kv_heads
    out.head_size = layout.head_size
    out.tensor_parallel_size = layout.tensor_parallel_size
    out.pipeline_parallel_size = layout.pipeline_parallel_size
    out.hash_algorithm = layout.hash_algorithm
    return out


def layout_from_proto(msg: pb.KvHandle) -> KvLayout:
    return KvLayout(
        model_id=msg.model_id,
        dtype=msg.dtype,
        block_size=msg.block_size,
        num_layers=msg.num_layers,
        num_kv_heads=msg.num_kv_heads,
        head_size=msg.head_size,
        tensor_parallel_size=msg.tensor_parallel_size,
        pipeline_parallel_size=msg.pipeline_parallel_size,
        hash_algorithm=msg.hash_algorithm,
    )


def handle_to_proto(handle: KvHandle) -> pb.KvHandle:
    msg = layout_to_proto(handle.layout, pb.KvHandle())
    msg.format_version = handle.format_version
    msg.transport = handle.transport
    msg.engine_id = handle.engine_id
    msg.block_ids.extend(handle.block_ids)
    msg.host = handle.host
    msg.port = handle.port
    msg.remote_request_id = handle.remote_request_id
    msg.lease_deadline_unix_ms = handle.lease_deadline_unix_ms
    msg.num_prompt_tokens = handle.num_prompt_tokens
    msg.extra.update(handle.extra)
    return msg


def handle_from_proto(msg: pb.KvHandle) -> KvHandle:
    return KvHandle(
        transport=msg.transport,
        layout=layout_from_proto(msg),
        engine_id=msg.engine_id,
        block_ids=tuple(msg.block_ids),
        host=msg.host,
        port=msg.port,
        remote_request_id=msg.remote_request_id,
        lease_deadline_unix_ms=msg.lease_deadline_unix_ms,
        num_prompt_tokens=msg.num_prompt_tokens,
        extra=dict(msg.extra),
        format_version=msg.format_version,
    )
