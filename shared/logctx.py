"""Log context and formats: every line logged while a job runs names the job and its tenant.

    with job_context(job_id, tenant_id):
        log.info("...")          # -> record.job_id, record.tenant_id set by ContextFilter

``LDMQ_LOG_FORMAT`` picks the format of every ldmq process (``ldmq`` calls
:func:`configure_logging`): ``text`` (the default, for people) or ``json`` (one JSON object a
line, for log shippers): ``{"ts", "level", "logger", "message", "job_id", "tenant_id", "process",
"thread"}`` plus ``exc_info`` when there is one.

The context lives in a ``contextvars.ContextVar``: a thread started inside ``job_context`` does
not inherit it (run its target under ``contextvars.copy_context().run``, or open its own
``job_context``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import Any

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_job: ContextVar[dict[str, str | None] | None] = ContextVar("ldmq_job", default=None)


@contextmanager
def job_context(job_id: str, tenant_id: str | None = None) -> Iterator[None]:
    """Tag every log record made inside the block with ``job_id`` and ``tenant_id``."""
    token = _job.set({"job_id": job_id, "tenant_id": tenant_id})
    try:
        yield
    finally:
        _job.reset(token)


def current_job() -> dict[str, str | None]:
    """``{"job_id", "tenant_id"}`` of the enclosing :func:`job_context` (None values outside one)."""
    return dict(_job.get() or {"job_id": None, "tenant_id": None})


class ContextFilter(logging.Filter):
    """Adds ``job_id`` and ``tenant_id`` to every record (None outside a job); never drops one.
    Fields set explicitly (``log.info(..., extra={"job_id": ...})``) are kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = _job.get() or {}
        for key in ("job_id", "tenant_id"):
            if getattr(record, key, None) is None:
                setattr(record, key, ctx.get(key))
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "job_id": getattr(record, "job_id", None),
            "tenant_id": getattr(record, "tenant_id", None),
            "process": record.process,
            "thread": record.threadName,
        }
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def log_format(value: str | None = None) -> str:
    """The configured format (``LDMQ_LOG_FORMAT``); an unknown one is an error naming the valid ones."""
    fmt = (value if value is not None else os.environ.get("LDMQ_LOG_FORMAT", "text")).strip().lower() or "text"
    if fmt not in LOG_FORMATS:
        raise ValueError(f"unknown LDMQ_LOG_FORMAT {fmt!r}; valid: {', '.join(LOG_FORMATS)}")
    return fmt


def configure_logging(level: int = logging.INFO, fmt: str | None = None, text_format: str = TEXT_FORMAT) -> str:
    """Install one stderr handler on the root logger with the context filter and the format
    (``text_format`` is the line layout of the text format). Returns the format used."""
    fmt = log_format(fmt)
    handler = logging.StreamHandler()
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(text_format))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    # JSON: Python warnings become log records too, so that the stream stays one object a line.
    logging.captureWarnings(fmt == "json")
    return fmt
