"""Server-sent events: a job's events as `id:`/`event:`/`data:` frames, with keep-alives and cancel-on-leave."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import closing
from typing import Protocol

from flask import Response

from api.errors import REDIS_DOWN
from shared.events import Event
from shared.fanout import StreamInterrupted
from shared.protocol import ErrorBody

log = logging.getLogger(__name__)  # a child of the app's logger; frames are sent outside the app context

KEEPALIVE = ": keep-alive\n\n"
"""A comment frame: keeps proxies from closing an idle stream and reveals a client that has left."""

RESTART_MESSAGE = ("this API process is restarting; the job goes on: resume with GET /jobs/<id>/stream and "
                   "Last-Event-ID (an EventSource reconnects by itself)")
"""The `error` a stream ends with when its API process stops: it carries no id, so Last-Event-ID stays at
the last event the client saw."""

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
"""Stop caches and nginx from holding frames back."""


def format_event(event: Event) -> str:
    """One SSE frame; JSON escapes newlines, so the data always fits on one `data:` line."""
    data = json.dumps(event.data, ensure_ascii=False, separators=(",", ":"))
    return f"id: {event.id}\nevent: {event.type}\ndata: {data}\n\n"


def error_frame(error_type: str, message: str) -> str:
    """A terminal error frame the API makes itself; it has no id, so a reconnect resumes at the last real event."""
    data = ErrorBody.of(error_type, message).model_dump_json()
    return f"event: error\ndata: {data}\n\n"


class Encoder(Protocol):
    """How a route writes a job's events on the wire (the native frames, or OpenAI's chunks)."""

    def event(self, event: Event) -> str:
        """The frame(s) for one event of the job ("" to send nothing)."""

    def failure(self, error_type: str, message: str) -> str:
        """A terminal error frame the API makes itself (the job store stopped answering)."""


class NativeEncoder:
    """`id:`/`event:`/`data:` frames carrying the events as workers publish them."""

    def event(self, event: Event) -> str:
        """The event as one SSE frame."""
        return format_event(event)

    def failure(self, error_type: str, message: str) -> str:
        """An `error` frame without an id."""
        return error_frame(error_type, message)


def relay(events: Iterator[Event | None], on_disconnect: Callable[[], None] | None = None,
          encoder: Encoder | None = None) -> Iterator[str]:
    """SSE text for `events` (from `shared.events.follow`); `on_disconnect` runs if the client leaves early.

    The WSGI server closes this generator (GeneratorExit at a `yield`) when a write to a departed
    client fails; keep-alives make that happen within `keepalive_s` even while the job is silent.
    """
    encoder = encoder or NativeEncoder()
    finished = False
    with closing(events):
        try:
            yield KEEPALIVE  # sends the headers (X-Job-Id) at once, before the first token
            for event in events:
                if event is None:
                    yield KEEPALIVE
                    continue
                finished = event.terminal
                frames = encoder.event(event)
                if frames:
                    yield frames
        except GeneratorExit:
            if not finished and on_disconnect is not None:
                _run_quietly(on_disconnect)
            raise
        except REDIS_DOWN as exc:
            log.warning("stream ended, redis unavailable: %s", exc)
            yield encoder.failure("unavailable", "the job store (Redis) stopped answering; reconnect to resume")
        except StreamInterrupted:  # the server is stopping; the job goes on and the client resumes elsewhere
            yield encoder.failure("unavailable", RESTART_MESSAGE)


def sse_response(frames: Iterator[str], job_id: str) -> Response:
    """A streaming `text/event-stream` response for `frames`."""
    headers = {**SSE_HEADERS, "X-Job-Id": job_id}
    return Response(frames, mimetype="text/event-stream", headers=headers)


def _run_quietly(callback: Callable[[], None]) -> None:
    """Run a clean-up callback; a failure is logged, never raised into the server's close()."""
    try:
        callback()
    except Exception:  # noqa: BLE001 - nothing can reach the departed client; log and go on
        log.exception("clean-up after a client disconnect failed")
