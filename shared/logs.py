"""Log lines of the API and the workers: human-readable text (the default) or one JSON object a line
(`LOG_FORMAT=json`), each carrying the id of the request and of the job it is about.

The ids live in context variables: the API binds the request id when a request starts (and the job id once
it has enqueued the job), the worker binds a job's ids while it admits, publishes or settles that job. A
log call anywhere below (Flask, RQ, our modules) then carries them without passing them along. A gunicorn
thread keeps serving one request until its response is closed, streams included, so the ids stay right for
the whole life of the request.
"""

from __future__ import annotations

import functools
import logging
import logging.config
import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime, timezone

from pythonjsonlogger.json import JsonFormatter as BaseJsonFormatter

from shared.settings import Settings

REQUEST_ID = ContextVar("request_id", default=None)
"""The id of the request being served (from `X-Request-Id`, or made up), or None outside one."""

JOB_ID = ContextVar("job_id", default=None)
"""The id of the job the current code works for, or None."""

CONTEXT = {"request_id": REQUEST_ID, "job_id": JOB_ID}
"""Every id a log line may carry, by field name."""

REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
"""What a client's `X-Request-Id` may be to be kept as is (what tracing proxies send: UUIDs, hex, base64)."""

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(process)d]: %(message)s"


def new_request_id(sent: str | None = None) -> str:
    """The client's request id when it is a sane token, else a new one (32 hex digits)."""
    if sent and REQUEST_ID_PATTERN.fullmatch(sent):
        return sent
    return uuid.uuid4().hex


def current_ids() -> dict[str, str]:
    """The ids bound now, by field name (those that are set)."""
    return {name: var.get() for name, var in CONTEXT.items() if var.get() is not None}


def bind(**ids: str | None) -> None:
    """Set ids for what this thread does from now on (a request's start; None unbinds)."""
    for name, value in ids.items():
        CONTEXT[name].set(value)


@contextmanager
def bound(**ids: str | None) -> Iterator[None]:
    """Bind ids for the duration of a block, then restore what was bound before."""
    tokens = [(CONTEXT[name], CONTEXT[name].set(value)) for name, value in ids.items()]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def for_job(ids_of: Callable[..., dict[str, str | None]]):
    """Decorator: run the method with the ids `ids_of(*args)` returns bound (a worker's per-job steps)."""
    def decorate(method):
        @functools.wraps(method)
        def wrapper(*args, **kwargs):
            with bound(**ids_of(*args, **kwargs)):
                return method(*args, **kwargs)
        return wrapper
    return decorate


class ContextFilter(logging.Filter):
    """Puts the bound ids on every record (a record's own `extra` ids win)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in current_ids().items():
            if getattr(record, name, None) is None:
                setattr(record, name, value)
        return True


class JsonFormatter(BaseJsonFormatter):
    """One JSON object a line: `time` (UTC, ISO 8601), `level`, `logger`, `message`, `process`, the bound ids,
    any `extra` fields of the call, and `exc_info` for an exception."""

    def __init__(self, **kwargs):
        kwargs.setdefault("rename_fields", {"levelname": "level", "name": "logger"})
        super().__init__("{levelname}{name}{message}{process}", style="{", **kwargs)

    def add_fields(self, log_data: dict, record: logging.LogRecord, message_dict: dict) -> None:
        log_data["time"] = datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds")
        super().add_fields(log_data, record, message_dict)
        for name, value in current_ids().items():
            log_data.setdefault(name, value)


class TextFormatter(logging.Formatter):
    """`time LEVEL logger [pid]: message`, then the bound ids as `name=value` (human-readable)."""

    def __init__(self, **kwargs):
        super().__init__(TEXT_FORMAT, **kwargs)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = [f"{name}={getattr(record, name, None) or var.get()}" for name, var in CONTEXT.items()
               if (getattr(record, name, None) or var.get()) is not None]
        if not ids:
            return line
        first, newline, rest = line.partition("\n")  # after the message, before a traceback
        return f"{first} [{' '.join(ids)}]{newline}{rest}"


FORMATTERS = {"text": TextFormatter, "json": JsonFormatter}


def dict_config(settings: Settings) -> dict:
    """`logging.config.dictConfig` input: every log line to stderr in LOG_FORMAT at LOG_LEVEL.

    Gunicorn takes it as `logconfig_dict`: its own lines then have the same format. Its access log is left
    out (WARNING): the API writes one access line per request itself, with the request and job ids.
    """
    formatter = f"{FORMATTERS[settings.log_format].__module__}.{FORMATTERS[settings.log_format].__qualname__}"
    handler = {"class": "logging.StreamHandler", "formatter": "main", "filters": ["context"],
               "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"main": {"()": formatter}},
        "filters": {"context": {"()": f"{ContextFilter.__module__}.{ContextFilter.__qualname__}"}},
        "handlers": {"main": handler},
        "root": {"level": settings.log_level.upper(), "handlers": ["main"]},
        "loggers": {
            "gunicorn.error": {"level": settings.log_level.upper(), "handlers": [], "propagate": True},
            "gunicorn.access": {"level": "WARNING", "handlers": [], "propagate": True},
        },
    }


def configure(settings: Settings) -> None:
    """Send every log line through our handler (`python -m api`, and workers under `rq worker`).

    RQ gives its loggers handlers of their own that do not propagate; those are removed so RQ's lines get
    the same format. Where the root logger already has handlers (a test run), only RQ's are touched.
    """
    root = logging.getLogger()
    if not root.handlers:
        logging.config.dictConfig(dict_config(settings))
        logging.captureWarnings(True)  # warnings.warn() as log lines too, in the same format
    for name in ("rq.worker", "rq.job"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler).__module__.startswith("rq."):
                logger.removeHandler(handler)
        logger.propagate = True
