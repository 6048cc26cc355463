"""Mutual TLS on the internal links, with real gRPC and a throwaway CA made per test:
router -> worker (Worker API) and worker -> worker (the gRPC KV transport)."""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import torch

from pdserve.config import Role, TlsConfig
from pdserve.errors import ConfigError, KvTransferError
from pdserve.kv_transfer.grpc_client import (
    ConsumerLayout,
    KvFetcher,
    SliceRequest,
    release_everything,
)
from pdserve.kv_transfer.grpc_server import KvTransferServer, RankLayout
from pdserve.kv_transfer.registry import transport_for
from pdserve.kv_transfer.vllm_connector import ConnectorSettings
from pdserve.router.workers import WorkerPool
from pdserve.tls import TlsMaterial, add_port, aio_channel, channel_credentials
from pdserve.v1 import common_pb2 as cpb
from pdserve.v1 import worker_pb2 as pb
from pdserve.v1 import worker_pb2_grpc
from tests.unit.fake_worker import FakeWorker
from tests.unit.tls_certs import ThrowawayCa

MODEL = "m"
BLOCK, HEAD = 16, 8


@pytest.fixture
def ca(tmp_path: Path) -> ThrowawayCa:
    return ThrowawayCa.create(tmp_path / "ca")


@pytest.fixture
def other_ca(tmp_path: Path) -> ThrowawayCa:
    return ThrowawayCa.create(tmp_path / "other", name="someone-else-ca")


@pytest.fixture
async def tls_worker(ca: ThrowawayCa) -> AsyncIterator[tuple[FakeWorker, str]]:
    """A fake decode worker on the Worker API with mTLS (the worker process's add_port)."""
    worker = FakeWorker(pb.ROLE_DECODE, MODEL)
    server = grpc.aio.server()
    worker_pb2_grpc.add_WorkerServicer_to_server(worker, server)
    port = add_port(server, "127.0.0.1:0", ca.issue("worker"))
    await server.start()
    yield worker, f"127.0.0.1:{port}"
    await server.stop(None)


async def _pool(address: str, tls: TlsConfig | None) -> WorkerPool:
    pool = WorkerPool(MODEL, rpc_timeout_s=2, poll_interval_s=60, tls=tls)
    pool.add([address], Role.DECODE)
    await pool.poll_once()
    return pool


async def test_router_with_a_cert_from_the_ca_reaches_the_worker(
    ca: ThrowawayCa, tls_worker: tuple[FakeWorker, str]
) -> None:
    _, address = tls_worker
    pool = await _pool(address, ca.issue("router"))
    try:
        (client,) = pool.workers
        assert client.healthy and client.info is not None
        assert client.info.model_id == MODEL
        request = pb.WorkerGenerateRequest(
            request_id="r1",
            prompt_token_ids=[1, 2],
            stage=pb.STAGE_DECODE,
            sampling=cpb.SamplingParams(max_tokens=3),
        )
        replies = [r async for r in client.stub.Generate(request)]
        assert [r.token_ids[0] for r in replies] == [100, 101, 102]
    finally:
        await pool.close()


async def test_worker_refuses_a_plaintext_client(
    tls_worker: tuple[FakeWorker, str], caplog: pytest.LogCaptureFixture
) -> None:
    worker, address = tls_worker
    caplog.set_level(logging.ERROR, "pdserve.router.workers")
    pool = await _pool(address, None)
    try:
        assert not pool.workers[0].healthy and pool.workers[0].info is None
        assert "may require TLS" in caplog.text
    finally:
        await pool.close()
    assert worker.requests == []


async def test_worker_refuses_a_client_without_a_certificate(
    ca: ThrowawayCa, tls_worker: tuple[FakeWorker, str]
) -> None:
    """Server-only TLS (the client trusts the CA but presents no certificate) is refused:
    the worker requires client authentication."""
    worker, address = tls_worker
    creds = grpc.ssl_channel_credentials(root_certificates=ca.ca_path.read_bytes())
    async with grpc.aio.secure_channel(address, creds) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await worker_pb2_grpc.WorkerStub(channel).GetInfo(pb.GetInfoRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert worker.requests == []


async def test_router_with_a_cert_from_another_ca_fails_clearly(
    other_ca: ThrowawayCa, tls_worker: tuple[FakeWorker, str], caplog: pytest.LogCaptureFixture
) -> None:
    """The router trusts another CA than the one that signed the worker (and vice versa):
    the worker never turns healthy, and the log names the TLS handshake as the cause."""
    _, address = tls_worker
    caplog.set_level(logging.ERROR, "pdserve.router.workers")
    wrong = other_ca.issue("router")
    pool = await _pool(address, wrong)
    try:
        assert not pool.workers[0].healthy and pool.workers[0].info is None
        assert "TLS handshake failed" in caplog.text
        assert str(other_ca.ca_path) in caplog.text
    finally:
        await pool.close()


async def test_server_name_override_checks_the_certificate_name(
    ca: ThrowawayCa, tmp_path: Path
) -> None:
    """Pods are dialled by IP: --tls-server-name says which name their certificate must
    carry. A certificate issued for another name is refused."""
    worker = FakeWorker(pb.ROLE_DECODE, MODEL)
    server = grpc.aio.server()
    worker_pb2_grpc.add_WorkerServicer_to_server(worker, server)
    port = add_port(server, "127.0.0.1:0", ca.issue("pod", hosts=("decode.pdserve.svc",)))
    await server.start()
    try:
        router = ca.issue("router")
        for name, ok in (("decode.pdserve.svc", True), (None, False), ("other.svc", False)):
            tls = TlsConfig(router.cert, router.key, router.ca, name)
            async with aio_channel(f"127.0.0.1:{port}", tls) as channel:
                stub = worker_pb2_grpc.WorkerStub(channel)
                try:
                    await stub.GetInfo(pb.GetInfoRequest(), timeout=5)
                    reached = True
                except grpc.aio.AioRpcError as e:
                    assert e.code() == grpc.StatusCode.UNAVAILABLE
                    reached = False
            assert reached is ok, name
    finally:
        await server.stop(None)


# ------------------------------------------------------------------ KV transfer over gRPC


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def kv_server(ca: ThrowawayCa) -> Iterator[KvTransferServer]:
    srv = KvTransferServer(
        "127.0.0.1", _free_port(), 30.0, RankLayout("float32", BLOCK, HEAD), tls=ca.issue("p0")
    )
    srv.start()
    yield srv
    srv.stop()


def _stage(server: KvTransferServer, request_id: str) -> torch.Tensor:
    tensor = torch.randn(2, 1, BLOCK, 2 * HEAD, generator=torch.Generator().manual_seed(3))
    server.staging.put(request_id, {0: tensor}, head_start=0, head_count=1)
    return tensor


def test_kv_fetch_over_mtls(ca: ThrowawayCa, kv_server: KvTransferServer) -> None:
    tensor = _stage(kv_server, "req")
    fetcher = KvFetcher(ConsumerLayout(torch.float32, BLOCK, HEAD), 10, ca.issue("d0"))
    want = SliceRequest("req", 0, 2, (0,), 0, 1, 1024)
    slices = fetcher.fetch(f"127.0.0.1:{kv_server.port}", want).slices
    assert torch.equal(slices[(0, 0, 1)], tensor)
    assert fetcher.release(f"127.0.0.1:{kv_server.port}", want)
    assert kv_server.staging.totals() == (0, 0, 0)


def test_kv_fetch_refused_without_the_right_certificate(
    other_ca: ThrowawayCa, kv_server: KvTransferServer
) -> None:
    _stage(kv_server, "req")
    want = SliceRequest("req", 0, 2, (0,), 0, 1, 1024)
    target = f"127.0.0.1:{kv_server.port}"
    layout = ConsumerLayout(torch.float32, BLOCK, HEAD)
    with pytest.raises(KvTransferError, match="may require TLS"):
        KvFetcher(layout, 5).fetch(target, want)
    with pytest.raises(KvTransferError, match="TLS handshake failed"):
        KvFetcher(layout, 5, other_ca.issue("d0")).fetch(target, want)
    assert release_everything("127.0.0.1", kv_server.port, 1, "req", timeout_s=2) == 0
    assert kv_server.stats.bytes_sent == 0
    assert kv_server.staging.get("req") is not None  # nobody without the CA's cert read it


def test_kv_tls_reaches_the_engine_connector(ca: ThrowawayCa) -> None:
    """The worker's TLS paths travel to the engine ranks in kv_connector_extra_config."""
    tls = ca.issue("p0")
    transport = transport_for("grpc", 30.0, port=7000, tls=tls)
    extra = transport.engine_kv_config(Role.PREFILL, "p0")["kv_connector_extra_config"]
    assert ConnectorSettings.from_extra(extra).tls == tls
    plain = transport_for("grpc", 30.0, port=7000).engine_kv_config(Role.PREFILL, "p0")
    assert ConnectorSettings.from_extra(plain["kv_connector_extra_config"]).tls is None


# ------------------------------------------------------------------ configuration


def test_tls_flags_are_all_or_nothing(ca: ThrowawayCa) -> None:
    assert TlsConfig.from_paths(None, None, None) is None
    with pytest.raises(ConfigError, match="missing --tls-key, --tls-ca"):
        TlsConfig.from_paths("c.crt", None, None)
    with pytest.raises(ConfigError, match="--tls-server-name needs"):
        TlsConfig.from_paths(None, None, None, "svc")
    tls = ca.issue("x")
    assert TlsConfig.from_paths(tls.cert, tls.key, tls.ca, "svc") == TlsConfig(
        tls.cert, tls.key, tls.ca, "svc"
    )


def test_unreadable_or_swapped_files_are_clear_config_errors(
    ca: ThrowawayCa, tmp_path: Path
) -> None:
    tls = ca.issue("x")
    with pytest.raises(ConfigError, match=r"--tls-cert .*nope.crt: cannot read it"):
        TlsMaterial.load(TlsConfig(str(tmp_path / "nope.crt"), tls.key, tls.ca))
    with pytest.raises(ConfigError, match=r"--tls-key .*: not a PEM file with a private key"):
        channel_credentials(TlsConfig(tls.cert, tls.cert, tls.ca))
    with pytest.raises(ConfigError, match=r"--tls-ca .*: not a PEM file with a certificate"):
        TlsMaterial.load(TlsConfig(tls.cert, tls.key, tls.key))


def test_cli_rejects_bad_tls_flags_before_starting_anything(ca: ThrowawayCa) -> None:
    from typer.testing import CliRunner

    from pdserve.cli import app

    result = CliRunner().invoke(
        app, ["worker", "--role", "decode", "--model", "tiny", "--tls-cert", "x.crt"]
    )
    assert result.exit_code == 2
    assert "missing --tls-key, --tls-ca" in result.output


async def test_health_only_port_mirrors_the_status_in_plaintext(ca: ThrowawayCa) -> None:
    """The worker's --health-port: probes without a certificate see the health status,
    and nothing else of the Worker API."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_health.v1._async import HealthServicer

    from pdserve.config import EngineConfig, WorkerConfig
    from pdserve.worker.server import _serve_health_only

    port = _free_port()
    config = WorkerConfig(
        Role.DECODE, EngineConfig("m", "m"), "d0", tls=ca.issue("w"), health_port=port
    )
    health = HealthServicer()
    server = await _serve_health_only(config, health)
    assert server is not None
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            for status in (
                health_pb2.HealthCheckResponse.SERVING,
                health_pb2.HealthCheckResponse.NOT_SERVING,
            ):
                await health.set("", status)
                reply = await check(health_pb2.HealthCheckRequest(), timeout=5)
                assert reply.status == status
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await worker_pb2_grpc.WorkerStub(channel).GetInfo(pb.GetInfoRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop(None)
    assert (
        await _serve_health_only(WorkerConfig(Role.DECODE, EngineConfig("m", "m"), "d"), health)
        is None
    )


def test_a_second_kv_server_cannot_share_the_port(kv_server: KvTransferServer) -> None:
    """No SO_REUSEPORT: another server (say a plaintext one) on an mTLS KV port fails to
    bind instead of silently taking a share of the connections."""
    with pytest.raises((RuntimeError, OSError)):
        KvTransferServer("127.0.0.1", kv_server.port, 30.0, RankLayout("float32", BLOCK, HEAD))
