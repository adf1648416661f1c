"""Which worker pool runs a request, and handing the job to that pool's RQ queue."""

from __future__ import annotations

import redis
from redis.client import Pipeline
from rq import Queue, Worker
from rq.serializers import JSONSerializer

from api.jobs import tracking
from shared.exceptions import NoWorkerError
from shared.protocol import JOB_FUNCTION, GenerationJob
from shared.recovery import retry_policy
from shared.settings import BACKENDS, Settings

DEAD_STATES = frozenset({"dead"})
"""Worker states that do not count as live (expired workers are already dropped by RQ)."""


def live_workers(connection: redis.Redis, pool: str) -> int:
    """Live workers listening on `pool`, from RQ's registry (a worker whose heartbeat key expired is gone)."""
    workers = Worker.all(queue=Queue(pool, connection=connection))
    return sum(1 for worker in workers if worker.get_state() not in DEAD_STATES)


def live_worker_counts(connection: redis.Redis) -> dict[str, int]:
    """Live workers of every pool."""
    return {pool: live_workers(connection, pool) for pool in BACKENDS}


def choose_backend(connection: redis.Redis, mode: str) -> str:
    """The pool for a request: `gpu` or `cpu` as asked, or for `auto` gpu when a gpu worker is live.

    Raises NoWorkerError (503) when the chosen pool has no live worker, so clients never wait on a
    queue nobody reads.
    """
    if mode == "auto":
        pool = "gpu" if live_workers(connection, "gpu") else "cpu"
        if pool == "cpu" and not live_workers(connection, "cpu"):
            raise NoWorkerError("no live worker in the 'gpu' or the 'cpu' pool")
        return pool
    if not live_workers(connection, mode):
        raise NoWorkerError(f"no live worker in the '{mode}' pool")
    return mode


def submit(connection: redis.Redis, job: GenerationJob, settings: Settings) -> None:
    """Enqueue `job` on its pool's queue as plain JSON, by the job function's dotted name."""
    queue = Queue(job.backend, connection=connection, serializer=JSONSerializer)
    meta = tracking.start(connection, [job], settings)  # its owner (API keys) first, and the request's id
    queue.enqueue(
        JOB_FUNCTION,
        kwargs={"payload": job.model_dump(mode="json")},
        job_id=job.job_id,
        job_timeout=settings.job_timeout_s,
        result_ttl=settings.backlog_ttl_s,
        failure_ttl=settings.backlog_ttl_s,
        description=describe(job),
        retry=retry_policy(settings),  # a job whose worker dies resumes on another (shared/recovery.py)
        meta=meta,
    )


def submit_many(connection: redis.Redis, pipeline: Pipeline, jobs: list[GenerationJob], settings: Settings,
                keep_s: int) -> None:
    """Add `jobs` to their pools' queues through `pipeline`, which the caller executes (one round trip).

    RQ keeps each job's outcome (the `done` event's data is its result) for `keep_s` seconds, which may
    outlive the events' backlog (BACKLOG_TTL_S).
    """
    by_pool: dict[str, list] = {}
    meta = tracking.start(pipeline, jobs, settings)  # in the same MULTI: never a job without its owner
    for job in jobs:
        by_pool.setdefault(job.backend, []).append(Queue.prepare_data(
            JOB_FUNCTION, kwargs={"payload": job.model_dump(mode="json")}, job_id=job.job_id,
            timeout=settings.job_timeout_s, result_ttl=keep_s, failure_ttl=keep_s, description=describe(job),
            retry=retry_policy(settings), meta=meta))
    for pool, data in by_pool.items():
        Queue(pool, connection=connection, serializer=JSONSerializer).enqueue_many(data, pipeline=pipeline)


def describe(job: GenerationJob) -> str:
    """RQ's description of a job; its default would repeat every prompt id, so keep the job hash small."""
    return f"{job.kind.value} {len(job.prompt_ids)} prompt tokens on {job.backend}"
