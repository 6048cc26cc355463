"""``pdserve router``: the router's command line and how its config file's sections and
flags combine into a RouterConfig."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from pdserve.cli_options import (
    DisaggregationOption,
    GrpcPortOption,
    HttpPortOption,
    LogFormatOption,
    OtlpEndpointOption,
    PolicyOption,
    ServedModelNameOption,
    TlsCaOption,
    TlsCertOption,
    TlsKeyOption,
    TlsServerNameOption,
    configure_logging,
    served_name,
    tls_config,
    tracing_config,
)
from pdserve.config import (
    AdmissionConfig,
    AuthConfig,
    DiscoveryConfig,
    DiscoveryMode,
    HealthConfig,
    RayConfig,
    RetryConfig,
    RouterConfig,
)
from pdserve.errors import ConfigError
from pdserve.models import DEFAULT_MODEL
from pdserve.scheduling_config import DisaggregationMode, PolicyConfig, SchedulingConfig


def read_config_file(config_file: Path | None) -> dict[str, object]:
    """The router's --config YAML as a mapping ({} without a file); a clear error else."""
    import yaml

    if config_file is None:
        return {}
    try:
        doc = yaml.safe_load(config_file.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise typer.BadParameter(f"cannot read {config_file}: {e}", param_hint="--config") from e
    if doc is not None and not isinstance(doc, dict):
        raise typer.BadParameter("must be a YAML mapping", param_hint="--config")
    return doc or {}


def _section(doc: dict[str, object], name: str) -> dict[str, object]:
    section = doc.get(name) or {}
    if not isinstance(section, dict):
        raise typer.BadParameter(f"its {name} section must be a mapping", param_hint="--config")
    return section


def discovery_from_config(
    mode: DiscoveryMode | None,
    config_file: Path | None,
    launcher_url: str | None = None,
    ray_address: str | None = None,
    ray_namespace: str | None = None,
) -> DiscoveryConfig:
    """The ``discovery`` section of the router's config file; ``--discovery`` wins over
    its ``mode``."""
    section = _section(read_config_file(config_file), "discovery")
    try:
        parsed = DiscoveryConfig.from_dict(section)
        return dataclasses.replace(
            parsed,
            mode=mode or parsed.mode,
            launcher_url=launcher_url or parsed.launcher_url,
            ray_address=ray_address or parsed.ray_address,
            ray_namespace=ray_namespace or parsed.ray_namespace,
        )
    except ConfigError as e:
        raise typer.BadParameter(e.message, param_hint="--config") from e


def scheduling_from_config(
    config_file: Path | None,
    prefill_policy: str | None,
    decode_policy: str | None,
    disaggregation: str | None,
) -> SchedulingConfig:
    """The config file's ``scheduling`` section; flags win over it."""
    from pdserve.router.scheduling.policy import POLICIES

    section = _section(read_config_file(config_file), "scheduling")
    try:
        parsed = SchedulingConfig.from_dict(section)
        if prefill_policy:
            parsed = dataclasses.replace(parsed, prefill=PolicyConfig(prefill_policy))
        if decode_policy:
            parsed = dataclasses.replace(parsed, decode=PolicyConfig(decode_policy))
        if disaggregation:
            mode = DisaggregationMode(disaggregation)
            split = dataclasses.replace(parsed.disaggregation, mode=mode)
            parsed = dataclasses.replace(parsed, disaggregation=split)
    except (ConfigError, ValueError) as e:
        raise typer.BadParameter(str(e), param_hint="--config / --policy") from e
    for name in (parsed.prefill.name, parsed.decode.name):
        if name not in POLICIES:
            raise typer.BadParameter(f"unknown policy {name!r}; use one of {', '.join(POLICIES)}")
    return parsed


def router(
    model: Annotated[
        str, typer.Option(help="'default', 'tiny' or a model folder (for the tokenizer)")
    ] = DEFAULT_MODEL,
    served_model_name: ServedModelNameOption = None,
    prefill: Annotated[
        list[str] | None, typer.Option(help="prefill worker host:port (repeat)")
    ] = None,
    decode: Annotated[
        list[str] | None, typer.Option(help="decode worker host:port (repeat)")
    ] = None,
    both: Annotated[
        list[str] | None, typer.Option(help="colocated worker host:port (repeat)")
    ] = None,
    discovery: Annotated[
        DiscoveryMode | None,
        typer.Option(
            help="static: the --prefill/--decode/--both list; kubernetes: watch pods "
            "(selectors from --config); launcher: follow `pdserve up` (--launcher-url); "
            "ray: follow `pdserve up --backend ray` (--ray-address). "
            "Default: the config file's mode, else static"
        ),
    ] = None,
    launcher_url: Annotated[
        str | None, typer.Option(help="the `pdserve up` control endpoint (launcher discovery)")
    ] = None,
    ray_address: Annotated[
        str | None, typer.Option(help="ray discovery: the Ray cluster (GCS host:port)")
    ] = None,
    ray_namespace: Annotated[
        str, typer.Option(help="ray discovery: the cluster's Ray namespace")
    ] = RayConfig.namespace,
    config_file: Annotated[
        Path | None,
        typer.Option("--config", help="router.yaml: its discovery section (Helm ConfigMap)"),
    ] = None,
    policy: PolicyOption = None,
    prefill_policy: Annotated[str | None, typer.Option(help="for prefill; over --policy")] = None,
    decode_policy: Annotated[str | None, typer.Option(help="for decode; over --policy")] = None,
    disaggregation: DisaggregationOption = None,
    http_host: str = RouterConfig.http_host,
    http_port: HttpPortOption = RouterConfig.http_port,
    grpc_host: str = RouterConfig.grpc_host,
    grpc_port: GrpcPortOption = RouterConfig.grpc_port,
    log_level: str = "info",
    log_format: LogFormatOption = None,
    otlp_endpoint: OtlpEndpointOption = None,
    timeline_ring: Annotated[
        int,
        typer.Option(
            help="completed request timelines kept for `pdserve inspect` (0: 256 when "
            "traces are exported, else none)",
            min=0,
        ),
    ] = 0,
    api_key: Annotated[
        list[str] | None,
        typer.Option(
            envvar="PDSERVE_API_KEY",
            help="accepted client API key (repeat; env: comma-separated); none: open API",
        ),
    ] = None,
    rate_limit_rps: Annotated[
        float, typer.Option(help="requests/s per API key (0: no limit)", min=0)
    ] = 0.0,
    tenant_isolation: Annotated[
        bool,
        typer.Option(
            help="separate prefix caches per tenant (API key; without keys the "
            "x-pdserve-tenant header), so no tenant can probe another's prompts by timing"
        ),
    ] = AuthConfig.tenant_isolation,
    max_in_flight: Annotated[
        int, typer.Option(help="requests served at once (0: no limit)", min=0)
    ] = AdmissionConfig.max_in_flight,
    max_queue: Annotated[
        int, typer.Option(help="requests waiting for a slot; more get 429", min=0)
    ] = AdmissionConfig.max_queue,
    queue_timeout: Annotated[
        float, typer.Option(help="seconds a request may wait for a slot", min=0)
    ] = AdmissionConfig.queue_timeout_s,
    retry_budget: Annotated[
        int, typer.Option(help="retries on other workers before the first token", min=0)
    ] = RetryConfig.budget,
    health_check_timeout: Annotated[
        float, typer.Option(help="deadline of a worker health check (s)", min=0.01)
    ] = HealthConfig.check_timeout_s,
    breaker_failures: Annotated[
        int, typer.Option(help="consecutive failures that open a worker's circuit", min=1)
    ] = HealthConfig.failure_threshold,
    breaker_cooldown: Annotated[
        float, typer.Option(help="seconds an open circuit waits for its probe", min=0)
    ] = HealthConfig.cooldown_s,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
    tls_ca: TlsCaOption = None,
    tls_server_name: TlsServerNameOption = None,
) -> None:
    """Run the router: OpenAI-compatible HTTP API and gRPC API in front of the workers."""
    from pdserve.models import resolve_model
    from pdserve.router.app import serve

    configure_logging(log_level, log_format)
    discovery_settings = discovery_from_config(
        discovery, config_file, launcher_url, ray_address, ray_namespace
    )
    if discovery_settings.mode is not DiscoveryMode.STATIC:
        if prefill or decode or both:
            raise typer.BadParameter("--prefill/--decode/--both are for --discovery=static")
    elif not (both or (prefill and decode)):
        raise typer.BadParameter("give --both workers, or --prefill and --decode workers")
    path = resolve_model(model)
    config = RouterConfig(
        model_path=str(path),
        served_model_name=served_name(path, served_model_name),
        prefill_workers=tuple(prefill or ()),
        decode_workers=tuple(decode or ()),
        both_workers=tuple(both or ()),
        http_host=http_host,
        http_port=http_port,
        grpc_host=grpc_host,
        grpc_port=grpc_port,
        discovery=discovery_settings,
        scheduling=scheduling_from_config(
            config_file, prefill_policy or policy, decode_policy or policy, disaggregation
        ),
        tracing=tracing_config(otlp_endpoint),
        timeline_ring=timeline_ring,
        health=HealthConfig(breaker_failures, breaker_cooldown, health_check_timeout),
        retry=RetryConfig(budget=retry_budget),
        admission=AdmissionConfig(
            max_in_flight=max_in_flight, max_queue=max_queue, queue_timeout_s=queue_timeout
        ),
        auth=AuthConfig(
            api_keys=api_keys_from(api_key),
            rate_limit_rps=rate_limit_rps,
            tenant_isolation=tenant_isolation,
        ),
        tls=tls_config(tls_cert, tls_key, tls_ca, tls_server_name),
    )
    asyncio.run(serve(config))


def api_keys_from(values: list[str] | None) -> tuple[str, ...]:
    """--api-key values; PDSERVE_API_KEY may hold several, comma-separated."""
    keys = [k.strip() for v in values or () for k in v.split(",")]
    return tuple(k for k in keys if k)
