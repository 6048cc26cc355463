"""Logging setup and the request id: text or JSON lines carrying request and trace ids.

The request id and trace id of the request a task serves live in a context variable set
once when the request arrives (each HTTP request and each gRPC call runs in its own
asyncio task, so the value follows that request's log lines and no other's).
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import uuid
from dataclasses import dataclass
from typing import IO

LOG_FORMATS = ("text", "json")
# What a client may choose as its request id; anything else is replaced by a fresh one
# (ids end up in logs, headers, metric-free span attributes and worker request ids).
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/+=-]{0,127}")


@dataclass(frozen=True)
class LogContext:
    request_id: str = ""
    trace_id: str = ""


_CONTEXT: contextvars.ContextVar[LogContext | None] = contextvars.ContextVar(
    "pdserve_log_context", default=None
)
_NO_CONTEXT = LogContext()


def request_id_from(client_value: str | None) -> str:
    """The client's request id if it is sane (printable, short), else a new random one."""
    if client_value and _SANE_REQUEST_ID.fullmatch(client_value):
        return client_value
    return uuid.uuid4().hex


def set_request_context(request_id: str, trace_id: str = "") -> None:
    """Tag the current task's log lines with this request (no reset: the task is the
    request's own)."""
    _CONTEXT.set(LogContext(request_id, trace_id))


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        ctx = _CONTEXT.get() or _NO_CONTEXT
        record.request_id = ctx.request_id
        record.trace_id = ctx.trace_id
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, trace_id."""

    def format(self, record: logging.LogRecord) -> str:
        obj = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("request_id", "trace_id"):
            value = getattr(record, key, "")
            if value:
                obj[key] = value
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        return json.dumps(obj, ensure_ascii=False)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        request_id = getattr(record, "request_id", "")
        return f"{line} [request_id={request_id}]" if request_id else line


def log_handler(log_format: str, stream: IO[str] | None = None) -> logging.Handler:
    """A handler writing ``text`` or ``json`` lines (to stderr by default)."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r}; use one of {LOG_FORMATS}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(_ContextFilter())
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    return handler


def setup_logging(level: str, log_format: str = "text") -> None:
    logging.basicConfig(level=level.upper(), handlers=[log_handler(log_format)])
