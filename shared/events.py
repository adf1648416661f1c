"""Per-job token events: published on Redis pub/sub and kept in a short backlog list with a TTL.

Pub/sub delivers at most once, so every event is also appended to `llm:job:<id>:events` (a list whose
index + 1 is the event id). A reader subscribes first, then reads the backlog, then takes live messages
with ids above the last one seen: nothing is lost between the two and nothing is repeated.

What each event carries is defined once, in `shared.protocol`; this module only numbers, stores and
delivers them. `done` and `error` end a stream.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

import redis
from redis.client import Pipeline

from shared.fanout import INTERRUPT, RESYNC, EventHub, StreamInterrupted
from shared.protocol import TERMINAL_EVENTS, ErrorBody, JobEvent

KEY_PREFIX = "llm:job:"


def backlog_key(job_id: str) -> str:
    """Redis list holding a job's events in order."""
    return f"{KEY_PREFIX}{job_id}:events"


def channel_name(job_id: str) -> str:
    """Redis pub/sub channel carrying a job's events live."""
    return f"{KEY_PREFIX}{job_id}:channel"


def cancel_key(job_id: str) -> str:
    """Redis key whose presence asks the worker to stop the job."""
    return f"{KEY_PREFIX}{job_id}:cancel"


@dataclass(frozen=True, slots=True)
class Event:
    """One event of a job's stream as stored: `id` counts from 1 within the job; `data` is a
    `shared.protocol` model's JSON (read it back with that model's `model_validate`)."""

    id: int
    type: str
    data: dict

    def encode(self) -> str:
        return json.dumps({"id": self.id, "type": self.type, "data": self.data}, separators=(",", ":"))

    @classmethod
    def decode(cls, raw: str | bytes) -> Event:
        message = json.loads(raw)
        return cls(message["id"], message["type"], message["data"])

    @classmethod
    def of(cls, event_id: int, event: JobEvent) -> Event:
        """The stored form of a protocol event."""
        return cls(event_id, event.event_type, event.model_dump(mode="json"))

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_EVENTS


class EventPublisher:
    """Worker side: numbers a job's events, appends them to the backlog and publishes them."""

    def __init__(self, connection: redis.Redis, job_id: str, ttl_s: int):
        self.connection = connection
        self.job_id = job_id
        self.ttl_s = ttl_s
        self.next_id = 1

    def publish(self, event: JobEvent) -> Event:
        """Append and publish one event atomically (one MULTI round trip)."""
        pipe = self.connection.pipeline(transaction=True)
        stored = self.append(pipe, event)
        pipe.execute()
        return stored

    def append(self, pipe: Pipeline, event: JobEvent) -> Event:
        """Number `event` and queue its append and publication on `pipe`."""
        stored = Event.of(self.next_id, event)
        self.next_id += 1
        encoded = stored.encode()
        pipe.rpush(backlog_key(self.job_id), encoded)
        pipe.expire(backlog_key(self.job_id), self.ttl_s)
        pipe.publish(channel_name(self.job_id), encoded)
        return stored


def publish_many(connection: redis.Redis, batch: list[tuple[EventPublisher, JobEvent]]) -> None:
    """Publish events of several jobs in one round trip (the batching worker's per-step flush)."""
    if not batch:
        return
    pipe = connection.pipeline(transaction=False)
    for publisher, event in batch:
        publisher.append(pipe, event)
    pipe.execute()


def read_backlog(connection: redis.Redis, job_id: str, after_id: int = 0) -> list[Event]:
    """Events of a job with ids above `after_id`, from the backlog."""
    return [Event.decode(raw) for raw in connection.lrange(backlog_key(job_id), after_id, -1)]


def _ended_by(connection: redis.Redis, job_id: str, event_id: int) -> bool:
    """Whether the job's terminal event (always the backlog's last) has an id no greater than `event_id`."""
    raw = connection.lindex(backlog_key(job_id), -1)
    if raw is None:
        return False
    last = Event.decode(raw)
    return last.terminal and last.id <= event_id


def follow(hub: EventHub, job_id: str, after_id: int = 0, *, keepalive_s: float = 5.0, is_alive=None,
           check_every_s: float = 2.0, resumable: bool = False) -> Iterator[Event | None]:
    """Yield a job's events after `after_id` until a terminal one; `None` every `keepalive_s` of silence.

    The wake-ups come through the process's `hub` (one pub/sub connection for every stream); the backlog is
    read first, on a wake-up that does not follow on from the last event, and every `check_every_s` of
    silence, so a wake-up lost to a reconnect costs at most that long. `is_alive()` (optional) is asked
    then too; when it says False (the job is gone, for example its worker died for good), the stream ends
    with the job's last events if it published any, else with a `job_lost` error, instead of waiting
    forever. A `resumable` stream raises `StreamInterrupted` when the process stops (its client resumes).
    """
    connection = hub.connection
    with hub.subscribe(channel_name(job_id), resumable=resumable) as wakeups:
        if after_id and _ended_by(connection, job_id, after_id):
            return  # the reader has seen the terminal event already (a reconnecting EventSource)
        pending = read_backlog(connection, job_id, after_id)
        last_id = after_id
        silent_since = checked_at = time.monotonic()
        while True:
            for event in pending:
                last_id = event.id
                yield event
                if event.terminal:
                    return
            if pending:
                silent_since = checked_at = time.monotonic()
            wake = wakeups.get(timeout=min(1.0, keepalive_s, check_every_s))
            if wake == INTERRUPT:
                raise StreamInterrupted(job_id)
            pending = _events_after(connection, job_id, last_id, wake) if wake is not None else []
            clock = time.monotonic()
            if not pending and clock - checked_at >= check_every_s:
                checked_at = clock
                pending = read_backlog(connection, job_id, last_id)  # the truth, whatever pub/sub delivered
                if not pending and is_alive is not None and not is_alive():
                    pending = _last_events(connection, job_id, last_id)
            if not pending and clock - silent_since >= keepalive_s:
                silent_since = clock
                yield None


def _events_after(connection: redis.Redis, job_id: str, last_id: int, wake: bytes | str) -> list[Event]:
    """The events a wake-up brings: the message's event when it follows on from `last_id`, nothing for one
    seen already, else (a gap, or `RESYNC`) the backlog after `last_id`."""
    if wake != RESYNC:
        event = Event.decode(wake)
        if event.id <= last_id:
            return []
        if event.id == last_id + 1:
            return [event]
    return read_backlog(connection, job_id, last_id)


def _last_events(connection: redis.Redis, job_id: str, last_id: int) -> list[Event]:
    """The events of a job that will publish no more: the backlog after `last_id` (it may have just
    finished), ending with a `job_lost` error when it has no terminal event."""
    events = read_backlog(connection, job_id, last_id)
    if events and events[-1].terminal:
        return events
    lost_id = (events[-1].id if events else last_id) + 1
    return [*events, Event.of(lost_id, ErrorBody.of("job_lost", "the job ended without a result (worker lost)"))]
