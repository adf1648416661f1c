"""A batch of generation jobs in Redis: its record, enqueueing its jobs, and reading their outcomes.

`llm:batch:<id>` is a hash (`job_ids`, `prompts` as JSON lists, `backend`) that lives
BATCH_TTL_S; it is written in the same MULTI as the jobs are enqueued, so a batch is never half there.
A job's outcome comes from its event backlog (its terminal `done` or `error` event). The backlog lives
only BACKLOG_TTL_S, so the jobs are enqueued to keep their RQ result (the `done` event's data) for
BATCH_TTL_S too, and a result is read from RQ once the backlog is gone.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass

import redis
from redis.client import Pipeline
from rq.job import JobStatus

from api.jobs import tracking
from api.jobs.routing import submit
from api.jobs.state import GONE_STATUSES, fetch_job, follow_job
from api.models.generation import GenerationResult
from shared.events import Event, backlog_key, read_backlog
from shared.exceptions import NotFoundError
from shared.fanout import EventHub
from shared.lanes import Lane
from shared.protocol import DoneEvent, ErrorBody, GenerationJob
from shared.settings import Settings

BATCH_KEY_PREFIX = "llm:batch:"

ENDED_STATUSES = GONE_STATUSES | {JobStatus.FINISHED}
"""RQ statuses of a job that will publish nothing more."""


def batch_key(batch_id: str) -> str:
    """Redis hash holding a batch's record."""
    return f"{BATCH_KEY_PREFIX}{batch_id}"


@dataclass(frozen=True, slots=True)
class BatchRecord:
    """What the API keeps about a batch: its jobs in the prompts' order, and what their answers repeat."""

    batch_id: str
    job_ids: list[str]
    prompts: list[str]
    backend: str

    def to_hash(self) -> dict[str, str]:
        """The Redis hash's fields."""
        return {"job_ids": json.dumps(self.job_ids), "prompts": json.dumps(self.prompts), "backend": self.backend}

    @classmethod
    def from_hash(cls, batch_id: str, fields: dict[bytes, bytes]) -> BatchRecord:
        """Rebuild a record from its hash (as read with HGETALL)."""
        values = {key.decode(): value.decode() for key, value in fields.items()}
        return cls(batch_id, json.loads(values["job_ids"]), json.loads(values["prompts"]), values["backend"])


def create_batch(connection: redis.Redis, jobs: list[GenerationJob], prompts: list[str],
                 settings: Settings) -> BatchRecord:
    """Record the batch and enqueue its jobs on the pool's batch lane, all in one MULTI (or none of it: a 429
    when the lane cannot hold them all)."""
    record = BatchRecord(uuid.uuid4().hex, [job.job_id for job in jobs], prompts, jobs[0].backend)

    def write_record(pipe: Pipeline) -> None:
        pipe.hset(batch_key(record.batch_id), mapping=record.to_hash())
        pipe.expire(batch_key(record.batch_id), settings.batch_ttl_s)
        tracking.claim(pipe, "batch", [record.batch_id], settings)

    submit(connection, jobs, Lane.BATCH, settings, keep_s=settings.batch_ttl_s, also=write_record)
    return record


def load_batch(connection: redis.Redis, batch_id: str) -> BatchRecord:
    """The batch's record; NotFoundError (404) for an unknown or expired id."""
    fields = connection.hgetall(batch_key(batch_id))
    if not fields:
        raise NotFoundError(f"no batch with id {batch_id!r} (unknown, or older than BATCH_TTL_S)", field="batch_id")
    return BatchRecord.from_hash(batch_id, fields)


def slot(record: BatchRecord, index: int, events: list[Event]) -> dict | None:
    """The answer for prompt `index` from its job's events: like /generate's, or `{"error"}`; None while running."""
    if not events or not events[-1].terminal:
        return None
    last = events[-1]
    if last.type == "error":
        return ErrorBody.model_validate(last.data).model_dump(mode="json")
    return GenerationResult.of(record.prompts[index], record.backend, DoneEvent.model_validate(last.data)).model_dump()


def current_results(connection: redis.Redis, record: BatchRecord) -> list[dict | None]:
    """Every prompt's answer so far (None for those still queued or running)."""
    with connection.pipeline(transaction=False) as pipe:  # every backlog in one round trip
        for job_id in record.job_ids:
            pipe.lrange(backlog_key(job_id), 0, -1)
        backlogs = [[Event.decode(raw) for raw in backlog] for backlog in pipe.execute()]
    return [slot(record, index, job_events(connection, job_id, backlog))
            for index, (job_id, backlog) in enumerate(zip(record.job_ids, backlogs, strict=True))]


def job_events(connection: redis.Redis, job_id: str, events: list[Event]) -> list[Event]:
    """The job's events, as read from its backlog; once that has expired, its outcome as RQ kept it."""
    if events and events[-1].terminal:
        return events
    job = fetch_job(connection, job_id)
    status = job.get_status(refresh=False) if job is not None else None
    result = job.return_value() if status == JobStatus.FINISHED else None
    if isinstance(result, dict):
        return [Event(1, "done", result)]
    if status is not None and status not in ENDED_STATUSES:
        return events  # queued or running
    events = read_backlog(connection, job_id)  # its error event may have been published meanwhile
    if events and events[-1].terminal:
        return events
    return [Event.of(len(events) + 1, ErrorBody.of(
        "job_lost", "the job ended without a result (worker lost, or its record expired)"))]


def wait_for_all(hub: EventHub, record: BatchRecord, settings: Settings) -> list[dict]:
    """Every prompt's answer, waiting for each job to end (they run in parallel; this only reads them)."""
    return [slot(record, index, list(_events_to_end(hub, job_id, settings)))
            for index, job_id in enumerate(record.job_ids)]


def _events_to_end(hub: EventHub, job_id: str, settings: Settings) -> Iterator[Event]:
    """The job's events up to its terminal one (`job_lost` when its RQ job vanishes), keep-alives left out."""
    with closing(follow_job(hub, job_id, settings)) as events:
        yield from (event for event in events if event is not None)


def progress(results: list[dict | None]) -> dict:
    """A batch's `status`, `progress` and `results` fields, from its results so far."""
    done = sum(result is not None for result in results)
    return {"status": "done" if done == len(results) else "running",
            "progress": {"done": done, "total": len(results)}, "results": results}
