"""What the API knows about a job: its RQ record and its event backlog; asking it to stop."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import redis
from flask import has_request_context, request
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import JOB_ID_PATTERN, Job, JobStatus
from rq.serializers import JSONSerializer

from api.jobs.routing import live_workers
from api.metrics import count_cancellation
from shared.events import Event, EventPublisher, backlog_key, cancel_key, follow
from shared.exceptions import NotFoundError
from shared.fanout import EventHub
from shared.lanes import pool_of
from shared.protocol import ErrorBody
from shared.recovery import forget_executions, recover_abandoned
from shared.settings import Settings

GONE_STATUSES = frozenset({JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED})
"""RQ statuses after which no worker will publish anything more for the job."""


def fetch_job(connection: redis.Redis, job_id: str) -> Job | None:
    """The RQ job, or None when RQ has no record of it (never enqueued, or expired)."""
    if not JOB_ID_PATTERN.fullmatch(job_id):
        return None
    try:
        return Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
    except NoSuchJobError:
        return None


def require_known(connection: redis.Redis, job_id: str) -> Job | None:
    """The RQ job (or None when only its backlog remains); NotFoundError when neither exists."""
    job = fetch_job(connection, job_id)
    if job is None and not connection.exists(backlog_key(job_id)):
        raise NotFoundError(f"no job with id {job_id!r}", field="job_id")
    return job


def alive_check(connection: redis.Redis, job_id: str, settings: Settings) -> Callable[[], bool]:
    """`is_alive` for `shared.events.follow`, asked while the job's stream is silent.

    It first recovers the pool's jobs whose worker died (this one is then requeued to resume elsewhere).
    False once the RQ job failed, stopped, was cancelled or vanished, and when no worker of its pool is
    left to run it: the job is then cancelled with a `no_worker` error event, so no client waits for nobody.
    """
    def is_alive() -> bool:
        job = fetch_job(connection, job_id)
        if job is None:
            return False
        recover_abandoned(connection, job.origin, settings)
        status = job.get_status(refresh=True)
        if status in GONE_STATUSES:
            return False
        if status != JobStatus.QUEUED or live_workers(connection, job.origin):
            return True  # running, or waiting for a live worker (a dead worker's job is recovered first)
        end_job(connection, job_id, settings, ErrorBody.of("no_worker", (
            f"no live worker is left in the '{pool_of(job.origin)}' pool to run the job (the last one stopped "
            f"heart-beating for WORKER_DEAD_S); the job is cancelled")))
        return False
    return is_alive


def follow_job(hub: EventHub, job_id: str, settings: Settings, after_id: int = 0, *,
               resumable: bool = False) -> Iterator[Event | None]:
    """`shared.events.follow` for a job, ending with an error event if it fails, vanishes or has no worker.

    `resumable`: an event stream, which the process ends when it stops (the client resumes elsewhere).
    """
    return follow(hub, job_id, after_id, keepalive_s=settings.keepalive_s, resumable=resumable,
                  is_alive=alive_check(hub.connection, job_id, settings), check_every_s=min(2.0, settings.keepalive_s))


def last_event(connection: redis.Redis, job_id: str) -> Event | None:
    """The newest event in the job's backlog."""
    raw = connection.lindex(backlog_key(job_id), -1)
    return Event.decode(raw) if raw is not None else None


def request_cancel(connection: redis.Redis, job_id: str, settings: Settings) -> str:
    """Ask a job to stop. Returns `cancelled` (it was still queued and will never run) or `cancelling`.

    The cancel key tells a worker running the job to end it. A job still waiting in its queue is
    cancelled in RQ right away and gets a terminal `cancelled` error event, so its streams end now.
    """
    ended = end_job(connection, job_id, settings, ErrorBody.of("cancelled", "the job was cancelled before it started"))
    count_cancellation("requested" if has_request_context() and request.method == "DELETE" else "client_left")
    return "cancelled" if ended else "cancelling"


def end_job(connection: redis.Redis, job_id: str, settings: Settings, error: ErrorBody) -> bool:
    """Stop a job for good: a running one through its cancel key; a queued one at once, in RQ, with `error`
    as its terminal event. Returns whether it was still queued (and so has ended now)."""
    connection.set(cancel_key(job_id), "1", ex=max(settings.job_timeout_s, settings.backlog_ttl_s))
    job = fetch_job(connection, job_id)
    if job is None or job.get_status(refresh=False) != JobStatus.QUEUED:
        return False
    forget_executions(connection, job)  # queued: none of its executions runs
    try:
        job.cancel()
    except InvalidJobOperation:  # cancelled by a concurrent request in the meantime
        return False
    publisher = EventPublisher(connection, job_id, settings.backlog_ttl_s)
    publisher.next_id = connection.llen(backlog_key(job_id)) + 1
    publisher.publish(error)
    return True


def describe(connection: redis.Redis, job_id: str) -> dict:
    """Status JSON of a known job: RQ's status, the event count, and the result or error once it ended."""
    job = require_known(connection, job_id)
    last = last_event(connection, job_id)
    status = job.get_status(refresh=False).value if job is not None else _status_from_event(last)
    body = {"job_id": job_id, "status": status, "backend": pool_of(job.origin) if job is not None else None,
            "events": last.id if last is not None else 0}
    if last is not None and last.type == "done":
        body["result"] = last.data
    elif last is not None and last.type == "error":
        body["error"] = ErrorBody.model_validate(last.data).error.model_dump(mode="json")
    return body


def _status_from_event(last: Event | None) -> str:
    """A status for a job RQ has forgotten, from its last event."""
    if last is None:
        return "unknown"
    return {"done": "finished", "error": "failed"}.get(last.type, "started")
