"""Request ids and the access log.

Every request gets an id: the client's `X-Request-Id` when it sends a sane one (a proxy's trace id), else a
new one; it is bound to every log line of the request (`shared/logs.py`) and sent back in `X-Request-Id`
on every answer, errors included. When the response is closed (a stream's last byte included) one access
line says what happened: method, path, status, duration, the key's name (never the key), the job id.
"""

from __future__ import annotations

import logging
import time

from flask import Flask, Response, g, request

from api.auth import current_key
from shared import logs

log = logging.getLogger("api.access")

QUIET_PATHS = frozenset({"/health", "/metrics"})
"""Probes and scrapes, every few seconds: their successful answers are logged at DEBUG only."""


def init_app(app: Flask) -> None:
    """Register first, so the id is bound before any other hook runs and the access line comes last."""
    app.before_request(start_request)
    app.after_request(finish_request)


def start_request() -> None:
    g.request_started = time.monotonic()
    g.request_id = logs.new_request_id(request.headers.get("X-Request-Id"))
    logs.bind(request_id=g.request_id, job_id=None)


def finish_request(response: Response) -> Response:
    request_id = g.get("request_id") or logs.new_request_id()
    response.headers["X-Request-Id"] = request_id
    started = g.get("request_started", time.monotonic())
    key = current_key()
    fields = {"method": request.method, "path": request.path, "status": response.status_code,
              "request_id": request_id, "job_id": response.headers.get("X-Job-Id") or logs.JOB_ID.get(),
              "key": key.name if key is not None else None, "remote_addr": request.remote_addr}
    fields = {name: value for name, value in fields.items() if value is not None}

    def log_access() -> None:
        duration_s = time.monotonic() - started
        level = logging.DEBUG if fields["path"] in QUIET_PATHS and fields["status"] < 400 else logging.INFO
        log.log(level, "%s %s %d %.3fs", fields["method"], fields["path"], fields["status"], duration_s,
                extra={**fields, "duration_s": round(duration_s, 6)})
        logs.bind(request_id=None, job_id=None)  # the thread's next request binds its own

    response.call_on_close(log_access)
    return response
