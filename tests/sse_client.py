"""A small Server-Sent Events reader for tests and benchmarks (requests with stream=True)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class SSEEvent:
    id: int | None
    event: str
    data: dict


def iter_events(response, *, keepalives: list | None = None) -> Iterator[SSEEvent]:
    """Parse `id:`/`event:`/`data:` blocks; comment lines (keep-alives) go to `keepalives` if given."""
    event_id, event_type, data_lines = None, "message", []
    for raw in response.iter_lines(decode_unicode=True):
        if raw is None:
            continue
        line = raw.rstrip("\r")
        if line == "":
            if data_lines:
                yield SSEEvent(event_id, event_type, json.loads("\n".join(data_lines)))
            event_id, event_type, data_lines = None, "message", []
        elif line.startswith(":"):
            if keepalives is not None:
                keepalives.append(line)
        else:
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "id":
                event_id = int(value)
            elif field == "event":
                event_type = value
            elif field == "data":
                data_lines.append(value)
