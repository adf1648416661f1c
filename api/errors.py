"""One error handler: every failure reaches the client as `{"error": {"type", "message"(, "field")}}`."""

from __future__ import annotations

import re
from collections.abc import Callable

from flask import Flask, Response, current_app, jsonify, request
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from werkzeug.exceptions import HTTPException

from shared.exceptions import ConfigurationError, OverloadedError, ServiceError, UnauthorizedError, UnavailableError
from shared.protocol import ErrorBody

REDIS_DOWN = (RedisConnectionError, RedisTimeoutError)
"""Redis failures that mean the service is unavailable rather than broken."""

JOB_ERRORS = {
    "cancelled": (409, "The job was cancelled (DELETE /jobs/<id>)."),
    "invalid_job": (422, "The worker could not run the job as given (say, its own context is shorter)."),
    "job_lost": (502, "The job was lost (its worker died)."),
    "queue_timeout": (429, "The pool was too busy to start the job within its queue deadline (`queue_deadline_s`, "
                           "or QUEUE_DEADLINE_S): it waited that long and was never started (type `queue_timeout`)."),
    "timeout": (504, "The job ran past JOB_TIMEOUT_S."),
}
"""Error types only workers (or the event follower) report -> their HTTP status and what it means; the
statuses of the other types come from shared/exceptions.py."""

JOB_ERROR_STATUS = {error_type: status for error_type, (status, _) in JOB_ERRORS.items()}


ERROR_FORMATS_KEY = "error_formats"
"""`app.extensions` entry: URL prefix -> function giving errors under it another shape (OpenAI's for /v1/)."""


def init_app(app: Flask) -> None:
    """Register the handler for every exception, HTTP ones (404, 405, 413...) included."""
    app.extensions[ERROR_FORMATS_KEY] = {}
    app.register_error_handler(Exception, handle_error)


def register_format(app: Flask, prefix: str, reshape: Callable[[dict, int], dict]) -> None:
    """Errors of requests under `prefix` get `reshape(native_body, status)` as their body."""
    app.extensions[ERROR_FORMATS_KEY][prefix] = reshape


def handle_error(error: Exception) -> tuple[Response, int]:
    """Turn any exception into the service's JSON error shape (or its prefix's shape) with a fitting status."""
    body, status, headers = error_body(error)
    for prefix, reshape in current_app.extensions.get(ERROR_FORMATS_KEY, {}).items():
        if request.path.startswith(prefix):
            body = reshape(body, status)
            break
    response = jsonify(body)
    response.headers.extend(headers)
    return response, status


def error_body(error: Exception) -> tuple[dict, int, list[tuple[str, str]]]:
    """The native `{"error": {...}}` body, the status and extra headers for any exception."""
    if isinstance(error, HTTPException):
        body = {"error": {"type": snake_case(error.name), "message": error.description}}
        # Keep headers such as `Allow` on a 405; jsonify sets the content type.
        headers = [(k, v) for k, v in error.get_headers() if k.lower() != "content-type"]
        return body, error.code or 500, headers
    if isinstance(error, REDIS_DOWN):
        current_app.logger.warning("redis unavailable: %s", error)
        error = UnavailableError("the job store (Redis) does not answer; try again shortly")
    if isinstance(error, OverloadedError):
        return error.to_dict(), error.status, error.headers
    if isinstance(error, UnauthorizedError):  # RFC 6750: say which scheme the key goes in
        return error.to_dict(), error.status, [("WWW-Authenticate", 'Bearer realm="llm-stream-server"')]
    if isinstance(error, ServiceError):
        return error.to_dict(), error.status, []
    if isinstance(error, ConfigurationError):
        current_app.logger.error("configuration error: %s", error)
        return {"error": {"type": "configuration_error", "message": str(error)}}, 500, []
    current_app.logger.exception("unhandled error")
    return {"error": {"type": "internal_error", "message": "internal server error"}}, 500, []


def error_from_event(event: ErrorBody) -> ServiceError:
    """The exception matching a job's terminal `error` event, with the status its type calls for."""
    error = ServiceError(event.error.message, field=event.error.field)
    error.error_type = event.error.type
    error.status = JOB_ERROR_STATUS.get(error.error_type) or _status_of_type(error.error_type)
    return error


def _status_of_type(error_type: str) -> int:
    """The status of the ServiceError subclass named `error_type`, 500 when none is."""
    pending = [ServiceError]
    while pending:
        cls = pending.pop()
        if cls.error_type == error_type:
            return cls.status
        pending.extend(cls.__subclasses__())
    return 500


def snake_case(name: str) -> str:
    """`Method Not Allowed` -> `method_not_allowed`."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
