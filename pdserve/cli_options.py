"""Command-line options and helpers that several ``pdserve`` commands share (their
defaults live in pdserve/config.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from pdserve.config import TlsConfig, TracingConfig
from pdserve.errors import ConfigError

LOG_FORMAT_ENV = "PDSERVE_LOG_FORMAT"
LogFormatOption = Annotated[
    str | None,
    typer.Option(
        help=f"text | json (JSON lines with request and trace ids); default ${LOG_FORMAT_ENV}"
    ),
]
OtlpEndpointOption = Annotated[
    str | None,
    typer.Option(help="export traces by OTLP to this endpoint (else the OTEL_* variables decide)"),
]
# Options that several commands take, declared once (their defaults: pdserve/config.py).
ModelOption = Annotated[
    str, typer.Option(help="'default' (SmolLM2-135M-Instruct), 'tiny', or a model folder")
]
ServedModelNameOption = Annotated[str | None, typer.Option(help="model id clients use")]
KvTransportOption = Annotated[str, typer.Option(help="nixl | grpc")]
KvSharedMemoryOption = Annotated[
    bool, typer.Option(help="grpc KV: workers on one host move it through /dev/shm (ADR 0015)")
]
HttpPortOption = Annotated[int, typer.Option(help="the router's OpenAI-compatible HTTP API")]
GrpcPortOption = Annotated[int, typer.Option(help="the router's gRPC API (pdserve.v1.Inference)")]
PolicyOption = Annotated[
    str | None,
    typer.Option(
        help="worker choice: round_robin, random, least_load, prefix, kv_aware, session "
        "(default kv_aware; the config file's scheduling section can reweight them)"
    ),
]
DisaggregationOption = Annotated[
    str | None,
    typer.Option(help="always | never | auto (per request, by the transfer-cost model)"),
]
# Mutual TLS on the internal links (router <-> workers, worker <-> worker KV over gRPC).
TlsCertOption = Annotated[
    str | None, typer.Option(help="mTLS: this process's certificate (PEM); with --tls-key/-ca")
]
TlsKeyOption = Annotated[str | None, typer.Option(help="mTLS: the certificate's private key")]
TlsCaOption = Annotated[
    str | None, typer.Option(help="mTLS: CA bundle that peers' certificates must chain to")
]
TlsServerNameOption = Annotated[
    str | None,
    typer.Option(help="mTLS: name expected in workers' certificates (default: the host dialled)"),
]


def configure_logging(level: str, log_format: str | None = None) -> None:
    from pdserve.logs import LOG_FORMATS, setup_logging

    log_format = log_format or os.environ.get(LOG_FORMAT_ENV) or "text"
    if log_format not in LOG_FORMATS:
        raise typer.BadParameter(f"use one of {LOG_FORMATS}", param_hint="--log-format")
    setup_logging(level, log_format)


def tracing_config(otlp_endpoint: str | None) -> TracingConfig:
    try:
        return TracingConfig.from_env(os.environ, otlp_endpoint)
    except ConfigError as e:
        raise typer.BadParameter(e.message, param_hint="--otlp-endpoint / OTEL_*") from e


def tls_config(
    cert: str | None, key: str | None, ca: str | None, server_name: str | None
) -> TlsConfig | None:
    """The mTLS flags, with the files read now: a bad path fails before any engine starts."""
    from pdserve.tls import TlsMaterial

    try:
        tls = TlsConfig.from_paths(cert, key, ca, server_name)
        if tls is not None:
            TlsMaterial.load(tls)
    except ConfigError as e:
        raise typer.BadParameter(e.message, param_hint="--tls-*") from e
    return tls


def served_name(path: Path, served: str | None) -> str:
    return served or path.name
