"""gunicorn's worker for the API (api/server.py): the answers gunicorn gives itself are JSON errors."""

from __future__ import annotations

import json
import socket

import pytest
from gunicorn.config import Config
from gunicorn.glogging import Logger
from gunicorn.http.errors import (
    InvalidHeaderName,
    InvalidRequestLine,
    LimitRequestHeaders,
    LimitRequestLine,
    UnsupportedTransferCoding,
)

from api.server import JsonErrorWorker


@pytest.fixture
def worker() -> JsonErrorWorker:
    cfg = Config()
    return JsonErrorWorker(age=1, ppid=0, sockets=[], app=None, timeout=30, cfg=cfg, log=Logger(cfg))


def answer_to(worker: JsonErrorWorker, error: Exception) -> tuple[str, dict, dict]:
    """What a client reads after gunicorn fails its request with `error`: status line, headers, JSON body."""
    server, client = socket.socketpair()
    with server, client:
        worker.handle_error(None, server, ("127.0.0.1", 5000), error)
        server.close()
        raw = b""
        while chunk := client.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    assert int(headers["Content-Length"]) == len(body)
    return status, headers, json.loads(body)


@pytest.mark.parametrize(("error", "status", "error_type"), [
    pytest.param(LimitRequestLine(10_021, 4094), "414 Request URI Too Long", "request_uri_too_long", id="long-url"),
    pytest.param(LimitRequestHeaders("limit request headers fields"), "431 Request Header Fields Too Large",
                 "request_header_fields_too_large", id="many-headers"),
    pytest.param(InvalidRequestLine("GARBAGE"), "400 Bad Request", "bad_request", id="request-line"),
    pytest.param(InvalidHeaderName("Bad Name"), "400 Bad Request", "bad_request", id="header-name"),
    pytest.param(UnsupportedTransferCoding("gzip"), "501 Not Implemented", "not_implemented", id="coding"),
])
def test_gunicorn_s_refusals_are_json_errors_with_gunicorn_s_status(worker, error, status, error_type):
    status_line, headers, body = answer_to(worker, error)
    assert status_line == f"HTTP/1.1 {status}"
    assert headers["Content-Type"] == "application/json" and headers["Connection"] == "close"
    assert body == {"error": {"type": error_type, "message": body["error"]["message"]}}
    assert str(error)[:50] in body["error"]["message"]


def test_a_failure_of_the_server_is_a_500_that_tells_nothing_of_it(worker):
    status_line, _, body = answer_to(worker, RuntimeError("secret detail"))
    assert status_line == "HTTP/1.1 500 Internal Server Error"
    assert body == {"error": {"type": "internal_error", "message": "internal server error"}}


def test_a_quoted_request_line_is_cut_short(worker):
    _, _, body = answer_to(worker, InvalidRequestLine("x" * 5000))
    assert len(body["error"]["message"]) < 300
