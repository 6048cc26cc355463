"""Shared real components for end-to-end tests: the tiny model and a plain vLLM reference.

The reference is one plain vLLM OpenAI server on the same model; it answers every prompt
once (greedy, with token ids) and stops before any pdserve cluster starts, so the cores
are not shared while the clusters run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from openai import OpenAI

from pdserve.models import resolve_model
from tests.e2e import processes
from tests.e2e.prompts import (
    CHAT_CASES,
    CHAT_MAX_TOKENS,
    COMPLETION_CASES,
    MAX_MODEL_LEN,
    SERVED_NAME,
)

REFERENCE_PORT = 28900
# Log folders of the clusters running now: a failing test gets their tails in its report.
_LIVE_LOG_DIRS: list[Path] = []
LOG_TAIL_LINES = 40


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        for log_dir in _LIVE_LOG_DIRS:
            for log in sorted(log_dir.glob("*.log")):
                lines = log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
                report.sections.append((f"cluster log {log}", "\n".join(lines)))
    return report


@dataclass(frozen=True)
class Answer:
    text: str
    token_ids: list[int]
    finish_reason: str


@dataclass(frozen=True)
class Reference:
    completions: list[Answer]
    chats: list[Answer]


def completion_answer(
    client: OpenAI, prompt: str, max_tokens: int, model: str = SERVED_NAME
) -> Answer:
    r = client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    choice = r.choices[0]
    return Answer(choice.text, list(choice.model_extra["token_ids"]), str(choice.finish_reason))


def chat_answer(client: OpenAI, messages: list[dict[str, str]]) -> Answer:
    r = client.chat.completions.create(
        model=SERVED_NAME,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=CHAT_MAX_TOKENS,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    choice = r.choices[0]
    ids = choice.model_extra["token_ids"]
    return Answer(choice.message.content or "", list(ids), str(choice.finish_reason))


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return resolve_model("tiny")


@contextlib.contextmanager
def plain_vllm(model: Path, served_name: str, port: int, log: Path) -> Iterator[OpenAI]:
    """One plain vLLM OpenAI server on ``model`` (the peer every equality test compares
    against), stopped on exit."""
    argv = [
        processes.PYTHON, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model),
        "--served-model-name", served_name,
        "--dtype", "float32",
        "--max-model-len", str(MAX_MODEL_LEN),
        "--enforce-eager",
        "--seed", "0",
        "--host", "127.0.0.1",
        "--port", str(port),
    ]  # fmt: skip
    proc = processes.start(argv, log, env={"VLLM_CPU_KVCACHE_SPACE": "1"})
    try:
        base = f"http://127.0.0.1:{port}"
        processes.wait_http_ok(f"{base}/v1/models", proc, log, timeout_s=300)
        yield OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
    finally:
        processes.stop(proc)


@pytest.fixture(scope="session")
def reference(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    log = tmp_path_factory.mktemp("reference") / "vllm.log"
    with plain_vllm(tiny_model, SERVED_NAME, REFERENCE_PORT, log) as client:
        return Reference(
            completions=[completion_answer(client, p, n) for p, n in COMPLETION_CASES],
            chats=[chat_answer(client, m) for m in CHAT_CASES],
        )


@dataclass(frozen=True)
class Cluster:
    http: str
    grpc: str
    metrics_ports: dict[str, int]
    proc_pid: int
    log: Path

    def openai(self) -> OpenAI:
        return OpenAI(base_url=f"{self.http}/v1", api_key="unused", max_retries=0, timeout=120)


def run_cluster(
    tiny_model: Path,
    log_dir: Path,
    base_port: int,
    extra: list[str],
    timeout_s: float,
    env: dict[str, str] | None = None,
) -> Iterator[Cluster]:
    """`pdserve up` as a user runs it (with ``env`` added to its environment); stopped
    with Ctrl-C (SIGINT) at the end."""
    http_port, grpc_port = base_port, base_port + 51
    worker_base, metrics_base, kv_base = base_port + 100, base_port + 200, base_port + 600
    argv = [
        processes.PYTHON, "-m", "pdserve.cli", "up",
        "--model", str(tiny_model),
        "--served-model-name", SERVED_NAME,
        "--max-model-len", str(MAX_MODEL_LEN),
        "--http-port", str(http_port),
        "--grpc-port", str(grpc_port),
        "--control-port", str(base_port + 52),
        "--worker-base-port", str(worker_base),
        "--metrics-base-port", str(metrics_base),
        "--kv-base-port", str(kv_base),
        "--log-dir", str(log_dir),
        *extra,
    ]  # fmt: skip
    log = log_dir / "up.log"
    log_dir.mkdir(parents=True, exist_ok=True)
    proc = processes.start(argv, log, env)
    _LIVE_LOG_DIRS.append(log_dir)
    try:
        processes.wait_http_ok(f"http://127.0.0.1:{http_port}/ready", proc, log, timeout_s)
        roles = ["prefill-0", "decode-0"]
        yield Cluster(
            http=f"http://127.0.0.1:{http_port}",
            grpc=f"127.0.0.1:{grpc_port}",
            metrics_ports={name: metrics_base + i for i, name in enumerate(roles)},
            proc_pid=proc.pid,
            log=log,
        )
    finally:
        processes.stop(proc)
        _LIVE_LOG_DIRS.remove(log_dir)
