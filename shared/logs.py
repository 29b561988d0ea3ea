"""Logs that follow a job: every line about a job carries its id, kind, step and attempt, and the
request id of the HTTP call that created it, in the API, the worker and the webhook delivery.

The context lives in ``contextvars`` (one per request in the API's event loop, one per task in a
worker), and a logging filter copies it onto every record, so code logs as usual and libraries'
lines (Celery, uvicorn) about the job carry it too. ``log_format`` "json" (the default, for log
collectors) writes one JSON object a line with python-json-logger; "text" is for a terminal
(``audio-analysis up`` sets it).
"""

from __future__ import annotations

import logging
import re
import sys
import uuid
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Iterator

FIELDS = ("request_id", "job_id", "kind", "attempt", "step")
_context: ContextVar[dict[str, Any]] = ContextVar("audio_analysis_log_context", default={})


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


def current(name: str) -> Any:
    return _context.get().get(name)


@contextmanager
def bound(**fields: Any) -> Iterator[None]:
    """Add fields to every log line written inside the block (and in what it awaits)."""
    token = _context.set({**_context.get(), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


def bind(**fields: Any) -> None:
    """Change a field for the rest of the current context (a job's step as it runs)."""
    _context.set({**_context.get(), **fields})


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        context = _context.get()
        if context.get("job_id") is None:
            context = {**context, **_about_a_job(record)}
        for name in FIELDS:
            if getattr(record, name, None) is None:
                setattr(record, name, context.get(name))
        return True


_JOB_PATH = re.compile(r"/jobs/([0-9a-f]{32})\b")
_JOB_ID = re.compile(r"\b[0-9a-f]{32}\b")


def _about_a_job(record: logging.LogRecord) -> dict[str, Any]:
    """Lines written outside the job's own context that still name it: Celery's task lines and
    uvicorn's access lines of /jobs/<id> (written after the request's context ended)."""
    found = _celery_task(record)
    if not found and record.name == "uvicorn.access" and isinstance(record.args, tuple):
        match = next((_JOB_PATH.search(a) for a in record.args if isinstance(a, str) and "/jobs/" in a), None)
        if match:
            found = {"job_id": match.group(1)}
    return found


def _celery_task(record: logging.LogRecord) -> dict[str, Any]:
    """Celery's own lines about a task ("received", "succeeded in", retries) name it in their
    arguments; its task id is the job id (shared/queue.py), so they get the job's fields too."""
    args = record.args if isinstance(record.args, dict) else None
    if not args or not isinstance(args.get("id"), str) or not str(args.get("name", "")).startswith("audio."):
        return {}
    name = str(args["name"]).removeprefix("audio.")
    if name != "deliver_webhook":
        return {"job_id": args["id"], "kind": name}
    # a delivery task has its own id; the job's is its argument
    found = _JOB_ID.search(str(args.get("args", "")))
    return {"job_id": found.group(0)} if found else {}


class TextFormatter(logging.Formatter):
    """``time level logger [job=… step=…] message`` for a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(context)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        parts = [f"{name}={getattr(record, name)}" for name in FIELDS if getattr(record, name, None) is not None]
        record.context = f" [{' '.join(parts)}]" if parts else ""
        return super().format(record)


def formatter(log_format: str) -> logging.Formatter:
    if log_format == "json":
        from pythonjsonlogger.json import JsonFormatter

        return JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s " + " ".join(f"%({f})s" for f in FIELDS),
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        )
    return TextFormatter()


# HTTP clients' own per-request lines, at INFO ("HTTP Request: GET <url> ..."): each names the
# whole URL, and a presigned file_url's query string is its credentials (a webhook_url's may be
# a token). What we fetch and deliver is logged by our own code, without the query string.
QUIET_LOGGERS = ("httpx", "httpcore")


def configure(log_format: str, level: str = "INFO", handlers: list[logging.Handler] | None = None) -> None:
    """Format the given handlers (default: the root logger's, or one on stderr)."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    root = logging.getLogger()
    if handlers is None:
        if not root.handlers:
            root.addHandler(logging.StreamHandler(sys.stderr))
        handlers = root.handlers
        root.setLevel(level)
    for handler in handlers:
        handler.setFormatter(formatter(log_format))
        if not any(isinstance(f, ContextFilter) for f in handler.filters):
            handler.addFilter(ContextFilter())
