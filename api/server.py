"""The gunicorn worker the API runs under (`worker_class` in deploy/gunicorn.conf.py): gunicorn's threaded
worker, except that the errors gunicorn answers itself are JSON in the service's shape.

gunicorn answers some requests before Flask sees them: a request line over `limit_request_line` (414), more
than `limit_request_fields` headers or one over `limit_request_field_size` (431), a malformed request line,
method, version or header (400), a transfer coding it does not support (501), and a failure with no
response started (500). Its `Worker.handle_error` decides the status and logs the error, then writes an
HTML page with `util.write_error`. Here the decision and the logging stay gunicorn's: its `handle_error`
runs against a stand-in for the client socket that keeps what it would have sent, and only the status line
of that is used; the client gets `{"error": {"type", "message"}}` instead.

The body is always the native shape, under /v1 too: for a 414 the path was never read in full, and for the
other errors gunicorn keeps no request to read it from. OpenAI's clients read `error.message` from it all
the same.
"""

from __future__ import annotations

import json
import selectors
import socket
import time
from collections import deque

from gunicorn import util
from gunicorn.workers.gthread import ThreadWorker
from werkzeug.http import HTTP_STATUS_CODES

from api.errors import snake_case

LINGER_S = 2.0
"""How long a closing connection's client may take to close its side (gunicorn's own close waits as long)."""

LINGER_MAX_BYTES = 65536
"""Unread bytes drained from a closing connection before it is closed all the same (gunicorn's cap)."""

MAX_DETAIL_CHARS = 200
"""A rejected request line or header is quoted in the message up to this many characters."""


class _ErrorCapture:
    """Stands in for the client socket while gunicorn's `handle_error` runs: keeps what it sends.

    `util.write_error` writes through `util.write_nonblock`, which asks for the timeout (0.0: already
    non-blocking, so it calls `sendall` at once); anything else is the real socket's (the access log reads it).
    """

    def __init__(self, sock):
        self._sock = sock
        self.sent = b""

    def gettimeout(self) -> float:
        return 0.0

    def sendall(self, data: bytes) -> None:
        self.sent += data

    def __getattr__(self, name):
        return getattr(self._sock, name)


class JsonErrorWorker(ThreadWorker):
    """gunicorn's gthread worker whose own error answers are JSON and whose closes never block its main loop."""

    def init_process(self):
        self.lingering: deque[tuple[float, socket.socket]] = deque()  # closing connections, by deadline
        super().init_process()

    def finish_request(self, conn, fs):
        """As gunicorn's, except that a connection that ends lingers on the poller (`linger`)."""
        if fs.cancelled() or fs.exception() is not None or fs.result() is not False:
            return super().finish_request(conn, fs)  # kept alive, deferred, or failed (closed at once)
        self.nr_conns -= 1
        self.linger(conn.sock)

    def linger(self, sock: socket.socket) -> None:
        """Close `sock` as RFC 9112 (9.6) asks: FIN now, then drain what the client still sends until it closes
        (`drain`, called by the poller) or LINGER_S passes (`murder_keepalived`)."""
        try:
            sock.shutdown(socket.SHUT_WR)
            sock.setblocking(False)
            self.poller.register(sock, selectors.EVENT_READ, self.drain)
        except (OSError, ValueError, KeyError):
            util.close(sock)
            return
        self.lingering.append((time.monotonic() + LINGER_S, sock))

    def drain(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(LINGER_MAX_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data or len(data) >= LINGER_MAX_BYTES:  # the client closed (or will not stop sending)
            self.end_linger(sock)

    def end_linger(self, sock: socket.socket) -> None:
        if sock.fileno() == -1:
            return  # closed already
        try:
            self.poller.unregister(sock)
        except (OSError, KeyError, ValueError):
            pass
        util.close(sock)

    def murder_keepalived(self, force=False):
        """gunicorn's sweep of expired kept-alive connections (every turn of the main loop), and of closing
        connections whose client has not closed within LINGER_S."""
        super().murder_keepalived(force)
        now = time.monotonic()
        while self.lingering and (force or self.lingering[0][0] <= now):
            self.end_linger(self.lingering.popleft()[1])

    def handle_error(self, req, client, addr, exc):
        capture = _ErrorCapture(client)
        super().handle_error(req, capture, addr, exc)
        answer = error_response(status_of(capture.sent), exc)
        try:
            util.write_nonblock(client, answer)
        except Exception:  # the client has gone: as gunicorn does, give up quietly
            self.log.debug("Failed to send error message.")


def status_of(sent: bytes) -> int:
    """The status of gunicorn's answer (414 for `HTTP/1.1 414 URI Too Long`); 500 when it sent none."""
    parts = sent.split(b"\r\n", 1)[0].split(b" ")
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 500


def error_body(status: int, exc: BaseException) -> dict:
    """`{"error": {"type", "message"}}`: the type as Flask names the same status (werkzeug's name, snake
    case), so a 414 or a 400 reads the same whichever layer refused it. A 500 is a failure of the server, not
    of the request: it says no more than the app's own 500 does."""
    if status == 500:
        return {"error": {"type": "internal_error", "message": "internal server error"}}
    detail = str(exc)
    if len(detail) > MAX_DETAIL_CHARS:
        detail = detail[:MAX_DETAIL_CHARS] + "..."
    return {"error": {"type": snake_case(_name(status)), "message": f"{_name(status)}: {detail}"}}


def error_response(status: int, exc: BaseException) -> bytes:
    """The whole HTTP/1.1 answer, closing the connection as gunicorn's does, with werkzeug's reason phrase as
    Flask's answers have it (gunicorn's 501 says `Bad Request`)."""
    body = json.dumps(error_body(status, exc)).encode()
    head = (f"HTTP/1.1 {status} {_name(status)}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode("latin-1") + body


def _name(status: int) -> str:
    """werkzeug's name for a status (`Request URI Too Long`), as Flask's answers use it."""
    return HTTP_STATUS_CODES.get(status, "Error")
