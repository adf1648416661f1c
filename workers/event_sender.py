"""Token events leave the batch loop through one background thread, so a step never waits on Redis.

A step's events go out as one pipeline (`publish_many`); on a busy 2-core machine that round trip took
~0.9 ms of an ~11 ms batch-1 step, because Redis and the API must be scheduled before it returns. Sent
from a thread, it overlaps the next step. One thread keeps the events in order; the worker calls
`flush` before anything that must follow them (a job's `done` or `error` event, its RQ settlement).
"""

from __future__ import annotations

import queue
import threading

import redis

from shared.events import EventPublisher, publish_many

EventBatch = list[tuple[EventPublisher, str, dict]]


class EventSender:
    """Publishes event batches in the order given, from a daemon thread."""

    def __init__(self, connection: redis.Redis):
        self.connection = connection
        self._batches: queue.Queue[EventBatch] = queue.Queue()
        self._error: Exception | None = None
        self._thread = threading.Thread(target=self._run, name="event-sender", daemon=True)
        self._thread.start()

    def send(self, batch: EventBatch) -> None:
        """Queue a batch; raises the error of an earlier batch that could not be sent."""
        self._raise_pending()
        if batch:
            self._batches.put(batch)

    def flush(self, raise_error: bool = True) -> Exception | None:
        """Wait until every queued batch is in Redis (or dropped after a failure).

        Raises the failure, or with `raise_error=False` returns it (the worker is already failing jobs).
        """
        self._batches.join()
        if raise_error:
            self._raise_pending()
            return None
        error, self._error = self._error, None
        return error

    def _raise_pending(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _run(self) -> None:
        while True:
            batch = self._batches.get()
            try:
                if self._error is None:  # after a failure, drop what follows until the worker has seen it
                    publish_many(self.connection, batch)
            except Exception as exc:  # noqa: BLE001: handed to the batch loop at its next send or flush
                self._error = exc
            finally:
                self._batches.task_done()
