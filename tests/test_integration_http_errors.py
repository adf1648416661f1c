"""What the HTTP server refuses before Flask sees the request is a JSON error too: real gunicorn, started as the
Procfile starts it (deploy/gunicorn.conf.py, api/server.py), answering over real sockets."""

from __future__ import annotations

import socket
import time

import pytest
import requests

pytestmark = pytest.mark.integration


def assert_json_error(response: requests.Response, status: int, error_type: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["Connection"] == "close"
    error = response.json()["error"]
    assert error["type"] == error_type and error["message"]
    assert set(error) == {"type", "message"}
    return error


def raw_exchange(service, request: bytes) -> requests.Response:
    """Send bytes no HTTP client would, and read the answer as `requests` would have."""
    with socket.create_connection(("127.0.0.1", int(service.base_url.rsplit(":", 1)[1])), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    response = requests.Response()
    response.status_code = int(status_line.split(" ")[1])
    response.headers.update(line.split(": ", 1) for line in header_lines)
    response._content = body
    return response


@pytest.mark.parametrize("path", ["/jobs/", "/v1/chat/completions/", "/health?q="])
def test_a_10000_character_url_is_a_414_json_error(tiny_service, path):
    response = requests.get(tiny_service.url(path + "a" * 10_000), timeout=10)
    error = assert_json_error(response, 414, "request_uri_too_long")
    assert "4094" in error["message"]  # gunicorn's limit_request_line, named so a client knows what to shorten


def test_under_v1_the_server_s_own_errors_keep_the_native_shape(tiny_service):
    """OpenAI's shape needs the path, which the server has not read when the request line is too long; OpenAI's
    clients read `error.message` from this shape as well."""
    response = requests.post(tiny_service.url("/v1/completions?" + "x" * 10_000), json={"prompt": "hi"}, timeout=10)
    assert "param" not in assert_json_error(response, 414, "request_uri_too_long")


def test_an_oversized_header_is_a_431_json_error(tiny_service):
    response = requests.get(tiny_service.url("/health"), headers={"X-Big": "a" * 9000}, timeout=10)
    assert_json_error(response, 431, "request_header_fields_too_large")


def test_too_many_headers_is_a_431_json_error(tiny_service):
    headers = {f"X-Header-{i}": "1" for i in range(150)}
    response = requests.get(tiny_service.url("/health"), headers=headers, timeout=10)
    assert_json_error(response, 431, "request_header_fields_too_large")


@pytest.mark.parametrize("request_bytes", [
    pytest.param(b"GARBAGE\r\n\r\n", id="request-line"),
    pytest.param(b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n", id="http-version"),
    pytest.param(b"GET /health HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n", id="header-line"),
    pytest.param(b"GET /health HTTP/1.1\r\nHost: x\r\nBad Name: 1\r\n\r\n", id="header-name"),
])
def test_a_malformed_request_is_a_400_json_error(tiny_service, request_bytes):
    assert_json_error(raw_exchange(tiny_service, request_bytes), 400, "bad_request")


def test_the_server_goes_on_serving_after_refusing(tiny_service):
    requests.get(tiny_service.url("/jobs/" + "a" * 10_000), timeout=10)
    assert requests.get(tiny_service.url("/health"), timeout=10).json()["workers"]["cpu"] == 1


def test_clients_that_keep_their_socket_open_after_the_answer_do_not_stall_the_server(tiny_service):
    """A connection that does not stay alive is closed gracefully (FIN, then the server waits for the client's
    close); gunicorn's own worker waits on its main loop, up to 2 s per connection, answering nobody meanwhile.
    Six HTTP/1.0 clients in turn, each holding its socket open after reading its whole answer, stalled both
    processes for about 4 s; here every answer arrives at once, and each still ends with the server's FIN."""
    address = ("127.0.0.1", int(tiny_service.base_url.rsplit(":", 1)[1]))
    holding, waits = [], []
    try:
        for _ in range(6):
            sock = socket.create_connection(address, timeout=10)
            holding.append(sock)
            sent = time.perf_counter()
            sock.sendall(b"GET /health HTTP/1.0\r\nHost: x\r\n\r\n")
            answer = b""
            while chunk := sock.recv(65536):  # to the server's FIN: the answer is whole, the socket stays open
                answer += chunk
            waits.append(time.perf_counter() - sent)
            assert answer.startswith(b"HTTP/1.0 200 OK") and b'"workers"' in answer, answer[:400]
    finally:
        for sock in holding:
            sock.close()
    assert max(waits) < 1.0, f"answers took {[round(w, 2) for w in waits]} s"
