"""Mutual TLS for pdserve's internal gRPC links: router -> worker and worker -> worker (KV).

One place builds the credentials so that every server requires a client certificate and
every client presents one; with no TlsConfig the same helpers give plaintext endpoints.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from pdserve.config import TlsConfig
from pdserve.errors import ConfigError

ChannelOptions = Sequence[tuple[str, Any]]
# What gRPC's details say when the TLS handshake, not the peer, is the problem.
_HANDSHAKE_MARKERS = ("ssl", "handshake", "certificate", "tls")


@dataclass(frozen=True)
class TlsMaterial:
    """The PEM bytes behind a TlsConfig, read once at start-up."""

    cert: bytes
    key: bytes
    ca: bytes
    server_name: str | None

    @classmethod
    def load(cls, config: TlsConfig) -> TlsMaterial:
        return cls(
            _read_pem(config.cert, "--tls-cert", b"CERTIFICATE"),
            _read_pem(config.key, "--tls-key", b"PRIVATE KEY"),
            _read_pem(config.ca, "--tls-ca", b"CERTIFICATE"),
            config.server_name,
        )


def _read_pem(path: str, flag: str, kind: bytes) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot read it: {e.strerror}") from e
    if b"-----BEGIN " not in data or kind not in data:
        raise ConfigError(f"{flag} {path}: not a PEM file with a {kind.decode().lower()}")
    return data


def server_credentials(config: TlsConfig) -> grpc.ServerCredentials:
    """Server side: present our certificate, require and verify the client's."""
    m = TlsMaterial.load(config)
    return grpc.ssl_server_credentials(
        [(m.key, m.cert)], root_certificates=m.ca, require_client_auth=True
    )


def channel_credentials(config: TlsConfig) -> grpc.ChannelCredentials:
    """Client side: verify the server against our CA and present our certificate."""
    m = TlsMaterial.load(config)
    return grpc.ssl_channel_credentials(
        root_certificates=m.ca, private_key=m.key, certificate_chain=m.cert
    )


def _options(tls: TlsConfig, options: ChannelOptions) -> list[tuple[str, Any]]:
    extra = [("grpc.ssl_target_name_override", tls.server_name)] if tls.server_name else []
    return [*options, *extra]


def add_port(server: grpc.Server | grpc.aio.Server, address: str, tls: TlsConfig | None) -> int:
    """Listen on ``address`` with mutual TLS when configured; the bound port (0: failed)."""
    if tls is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, server_credentials(tls))


def sync_channel(target: str, tls: TlsConfig | None, options: ChannelOptions = ()) -> grpc.Channel:
    if tls is None:
        return grpc.insecure_channel(target, list(options))
    return grpc.secure_channel(target, channel_credentials(tls), _options(tls, options))


def aio_channel(
    target: str, tls: TlsConfig | None, options: ChannelOptions = ()
) -> grpc.aio.Channel:
    if tls is None:
        return grpc.aio.insecure_channel(target, options=list(options))
    return grpc.aio.secure_channel(target, channel_credentials(tls), _options(tls, options))


def handshake_problem(error: grpc.RpcError, tls: TlsConfig | None) -> str | None:
    """A sentence for the log when ``error`` looks like a failed TLS handshake, else None.

    gRPC reports those as UNAVAILABLE, like a dead peer; the hint names the likely cause.
    """
    code = error.code() if hasattr(error, "code") else None
    details = (error.details() if hasattr(error, "details") else None) or ""
    if code is not grpc.StatusCode.UNAVAILABLE:
        return None
    lowered = details.lower()
    if tls is not None and any(marker in lowered for marker in _HANDSHAKE_MARKERS):
        return (
            "TLS handshake failed: the peer's certificate does not chain to --tls-ca "
            f"{tls.ca}, names another host, or it refused ours ({details})"
        )
    if tls is not None and "socket closed" in lowered:
        return f"the peer closed the connection during the TLS handshake ({details})"
    if tls is None and ("socket closed" in lowered or "handshake" in lowered):
        return f"the peer may require TLS (pass --tls-cert/--tls-key/--tls-ca): {details}"
    return None
