"""KV handle: layout compatibility, NIXL parameter round trip, decode-side checks."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest

from pdserve.decode_worker.stage import DecodeStage
from pdserve.errors import InvalidRequestError, KvIncompatibleError, KvTransferError
from pdserve.kv_transfer.metadata import KvLayout
from pdserve.kv_transfer.nixl import NixlTransport
from pdserve.kv_transfer.registry import transport_for
from pdserve.kv_transfer.wire import handle_from_proto, handle_to_proto
from pdserve.v1 import common_pb2

LAYOUT = KvLayout("m", "float32", 128, 4, 2, 32, 1, 1)

# What vLLM 0.32's NixlConnector returns from a finished prefill (observed on CPU).
PREFILL_PARAMS = {
    "do_remote_prefill": True,
    "do_remote_decode": False,
    "remote_block_ids": [[7, 8, 9]],
    "remote_engine_id": "prefill-0",
    "remote_request_id": "r1-8a285578",
    "remote_host": "127.0.0.1",
    "remote_port": 5600,
    "tp_size": 1,
    "dcp_size": 1,
    "pp_size": 1,
    "remote_num_tokens": 278,
    "remote_blocks_expiry_time": None,
    "transfer_mode": "pull",
}


def make_handle(now_ms: int | None = None) -> object:
    now = int(time.time() * 1000) if now_ms is None else now_ms
    return NixlTransport(30).handle_from_prefill(PREFILL_PARAMS, LAYOUT, 278, now)


def test_nixl_params_survive_the_wire() -> None:
    transport = NixlTransport(30)
    handle = transport.handle_from_prefill(PREFILL_PARAMS, LAYOUT, 278, now_ms=1_000)
    assert handle.block_ids == (7, 8, 9)
    assert handle.lease_deadline_unix_ms == 31_000
    back = handle_from_proto(handle_to_proto(handle))
    assert back == handle
    params = transport.decode_request_params(back)
    expected = {**PREFILL_PARAMS, "do_remote_prefill": True, "do_remote_decode": False}
    assert json.loads(json.dumps(params)) == expected


def test_unusable_prefill_params_are_a_transfer_error() -> None:
    with pytest.raises(KvTransferError):
        NixlTransport(30).handle_from_prefill({"remote_block_ids": [[1]]}, LAYOUT, 3, 0)
    two_groups = {**PREFILL_PARAMS, "remote_block_ids": [[1], [2]]}
    with pytest.raises(KvTransferError, match="one KV-cache group"):
        NixlTransport(30).handle_from_prefill(two_groups, LAYOUT, 3, 0)


@pytest.mark.parametrize(
    ("field", "value"),
    [("dtype", "bfloat16"), ("block_size", 16), ("num_layers", 30), ("model_id", "other")],
)
def test_layout_mismatch_names_the_field(field: str, value: object) -> None:
    producer = dataclasses.replace(LAYOUT, **{field: value})
    with pytest.raises(KvIncompatibleError, match=field):
        LAYOUT.check_compatible(producer, 1, transport_reshapes=True)


def test_parallel_shapes_only_matter_without_reshaping() -> None:
    producer = dataclasses.replace(LAYOUT, tensor_parallel_size=2)
    LAYOUT.check_compatible(producer, 1, transport_reshapes=True)
    with pytest.raises(KvIncompatibleError, match="tensor_parallel_size"):
        LAYOUT.check_compatible(producer, 1, transport_reshapes=False)
    with pytest.raises(KvIncompatibleError, match="format version"):
        LAYOUT.check_compatible(LAYOUT, 99, transport_reshapes=True)


def test_nixl_refuses_a_pipeline_parallel_producer() -> None:
    with pytest.raises(KvIncompatibleError, match="pipeline-parallel"):
        NixlTransport(30).check_shapes(
            dataclasses.replace(LAYOUT, pipeline_parallel_size=2), LAYOUT
        )
    NixlTransport(30).check_shapes(LAYOUT, dataclasses.replace(LAYOUT, pipeline_parallel_size=2))


def test_unknown_transport() -> None:
    with pytest.raises(KvTransferError, match="unknown KV transport"):
        transport_for("carrier-pigeon", 30)


class TestDecodeStage:
    stage = DecodeStage(NixlTransport(30), LAYOUT)
    sampling = common_pb2.SamplingParams(max_tokens=4, temperature=0)

    def test_accepts_a_matching_handle(self) -> None:
        msg = handle_to_proto(make_handle())  # type: ignore[arg-type]
        params = self.stage.sampling_params(self.sampling, msg, 278)
        kv = params.extra_args["kv_transfer_params"]
        assert kv["remote_block_ids"] == [[7, 8, 9]] and kv["do_remote_prefill"] is True

    def test_refuses_an_incompatible_handle(self) -> None:
        msg = handle_to_proto(make_handle())  # type: ignore[arg-type]
        msg.block_size = 16
        with pytest.raises(KvIncompatibleError, match="block_size"):
            self.stage.sampling_params(self.sampling, msg, 278)
        msg = handle_to_proto(make_handle())  # type: ignore[arg-type]
        msg.transport = "grpc"
        with pytest.raises(KvIncompatibleError, match="transport"):
            self.stage.sampling_params(self.sampling, msg, 278)

    def test_refuses_a_handle_for_another_prompt_or_an_expired_lease(self) -> None:
        msg = handle_to_proto(make_handle())  # type: ignore[arg-type]
        with pytest.raises(InvalidRequestError, match="278"):
            self.stage.sampling_params(self.sampling, msg, 12)
        expired = handle_to_proto(make_handle(now_ms=0))  # type: ignore[arg-type]
        with pytest.raises(KvTransferError, match="lease expired"):
            self.stage.sampling_params(self.sampling, expired, 278)

    def test_nixl_producer_outlasts_the_longest_decode_wait(self) -> None:
        """A NIXL read cannot be refused: the prefill engine holds the blocks (vLLM's
        kv_lease_duration) beyond the latest moment a decode request still waits."""
        from pdserve.config import Role

        transport = NixlTransport(30)
        msg = handle_to_proto(make_handle())  # type: ignore[arg-type]
        longest_wait_s = self.stage.kv_wait_s(msg)
        hold_s = transport.engine_kv_config(Role.PREFILL, "p")["kv_connector_extra_config"][
            "kv_lease_duration"
        ]
        assert longest_wait_s > 30 and hold_s >= longest_wait_s + 4
