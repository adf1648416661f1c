"""The one Server-Sent Events reader of the tests and benchmarks: for a streamed `requests` response
(`iter_events`), a whole body from Flask's test client (`parse_sse`), or any lines (`parse_lines`)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SSEEvent:
    """One event: its `id:` (a number where it is one; None without one), `event:` type ("message" without
    one) and data."""

    id: int | str | None
    event: str
    data: Any


def parse_lines(lines: Iterable[str], *, comments: list[str] | None = None,
                decode: Callable[[str], Any] | None = json.loads) -> Iterator[SSEEvent]:
    """Events of SSE lines: `id:`/`event:`/`data:` fields up to a blank line, an event only if it has data.

    Comment lines (keep-alives) go to `comments` if given; `decode` turns the data into a value (JSON by
    default; None keeps the text, e.g. OpenAI's `[DONE]`)."""
    event_id, event_type, data_lines = None, "message", []
    for raw in lines:
        line = raw.rstrip("\r")
        if line == "":
            if data_lines:
                data = "\n".join(data_lines)
                yield SSEEvent(event_id, event_type, decode(data) if decode else data)
            event_id, event_type, data_lines = None, "message", []
        elif line.startswith(":"):
            if comments is not None:
                comments.append(line)
        else:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "id":
                event_id = int(value) if value.isdigit() else value
            elif field == "event":
                event_type = value
            elif field == "data":
                data_lines.append(value)


def iter_events(response, *, keepalives: list[str] | None = None,
                decode: Callable[[str], Any] | None = json.loads) -> Iterator[SSEEvent]:
    """The events of a `requests` response opened with stream=True, as they arrive."""
    lines = (line for line in response.iter_lines(decode_unicode=True) if line is not None)
    return parse_lines(lines, comments=keepalives, decode=decode)


def parse_sse(body: str) -> tuple[list[dict], list[str]]:
    """Events (`{"id", "event", "data"}`, data decoded from JSON) and comment lines of a whole SSE body."""
    comments: list[str] = []
    events = [dataclasses.asdict(event) for event in parse_lines(body.split("\n"), comments=comments)]
    return events, comments
