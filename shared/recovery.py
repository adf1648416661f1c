"""Jobs whose worker died: noticed within WORKER_DEAD_S and put back on their pool's queue to resume.

A worker's running jobs carry RQ execution heartbeats with a TTL of WORKER_DEAD_S, refreshed every quarter
of that by the worker (`workers/liveness.py`). Once a heartbeat lapses, RQ's own `StartedJobRegistry.cleanup`
retries the job while it has retries left (it was enqueued with `Retry(max=MAX_RECOVERIES)`), or fails it
with `AbandonedJobError`. Running that cleanup is what recovering means here; the surviving workers run it
every few seconds, and so does the API for a stream that has gone silent. One process at a time per pool
(a short Redis lock), so a job is never requeued twice. A job out of retries gets a terminal `job_lost`
event, so every reader of its stream learns why it ended.
"""

from __future__ import annotations

import logging

import redis
from rq import Retry
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from shared.events import EventPublisher, backlog_key
from shared.protocol import ErrorBody
from shared.settings import Settings

log = logging.getLogger(__name__)

LOCK_PREFIX = "llm:recovery:"
"""`llm:recovery:<pool>`: held (a few seconds at most) by the process recovering that pool's jobs."""


def retry_policy(settings: Settings) -> Retry | None:
    """How many times RQ may requeue a job whose worker died (None when MAX_RECOVERIES is 0)."""
    return Retry(max=settings.max_recoveries) if settings.max_recoveries > 0 else None


def recover_abandoned(connection: redis.Redis, pool: str, settings: Settings) -> None:
    """Requeue (or, out of retries, fail) the pool's running jobs whose worker stopped heart-beating."""
    lock = f"{LOCK_PREFIX}{pool}"
    if not connection.set(lock, "1", nx=True, ex=max(1, settings.worker_dead_s)):
        return  # another process is recovering this pool right now
    try:
        registry = StartedJobRegistry(pool, connection=connection, serializer=JSONSerializer)
        registry.cleanup(exception_handlers=[lambda job, *exc_info: _report(connection, job, settings)])
    finally:
        connection.delete(lock)


def forget_executions(connection: redis.Redis, job: Job) -> None:
    """Drop the job's record of executions that are not running any more.

    RQ keeps an execution's id in the job's execution registry 60 s longer than the execution itself lives,
    and `job.cancel()` fails on an id whose execution has expired; with heartbeats as short as WORKER_DEAD_S
    a dead worker's execution leaves exactly such an id. Call only when no execution of the job is running.
    """
    connection.delete(job.execution_registry.key)


def _report(connection: redis.Redis, job: Job, settings: Settings) -> None:
    """Log a recovered job; publish `job_lost` for one that will not be retried again."""
    forget_executions(connection, job)  # its worker is dead: none of its executions runs
    if job.retries_left:
        log.warning("job %s: its worker %s stopped heart-beating; requeued to resume (%d recoveries left)",
                    job.id, job.worker_name, job.retries_left - 1)
        return
    log.warning("job %s: its worker %s stopped heart-beating and the job is out of recoveries", job.id,
                job.worker_name)
    publisher = EventPublisher(connection, job.id, settings.backlog_ttl_s)
    publisher.next_id = connection.llen(backlog_key(job.id)) + 1
    publisher.publish(ErrorBody.of("job_lost", (
        f"the worker running the job died {settings.max_recoveries + 1} times (MAX_RECOVERIES is "
        f"{settings.max_recoveries}); it is not tried again")))
