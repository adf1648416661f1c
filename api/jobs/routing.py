"""Which worker pool runs a request, and handing the job to that pool's RQ queue."""

from __future__ import annotations

from collections.abc import Callable

import redis
from redis.client import Pipeline
from rq import Queue

from api.jobs import tracking
from api.jobs.admission import enqueue_within_bound
from shared.exceptions import NoWorkerError
from shared.lanes import Lane, pool_workers, read_pools
from shared.protocol import JOB_FUNCTION, GenerationJob
from shared.recovery import retry_policy
from shared.settings import BACKENDS, Settings


def live_workers(connection: redis.Redis, pool: str) -> int:
    """Live workers listening on `pool`, starting ones included (a request for their pool waits for them), from
    RQ's registry: a worker whose heartbeat key expired is gone."""
    return len(pool_workers(connection, pool))


def worker_counts(connection: redis.Redis) -> dict[str, dict[str, int]]:
    """Per pool, its workers that take jobs (`ready`) and those still loading their model (`starting`)."""
    counts = {}
    for pool, workers in read_pools(connection, list(BACKENDS))[0].items():
        starting = sum(worker.starting for worker in workers)
        counts[pool] = {"ready": len(workers) - starting, "starting": starting}
    return counts


def choose_backend(connection: redis.Redis, mode: str) -> str:
    """The pool for a request: `gpu` or `cpu` as asked; for `auto`, the first of gpu and cpu with a ready worker,
    else the first with a starting one (the request then waits in its queue for the worker to load).

    Raises NoWorkerError (503) when no pool has a live worker for `auto`; for a pool asked by name, `submit`
    raises it (its admission check reads the pool's workers anyway), so clients never wait on a queue nobody reads.
    """
    if mode != "auto":
        return mode
    counts = worker_counts(connection)
    for state in ("ready", "starting"):
        for pool in BACKENDS:  # gpu first
            if counts[pool][state]:
                return pool
    raise NoWorkerError("no live worker in the 'gpu' or the 'cpu' pool")


def submit(connection: redis.Redis, jobs: list[GenerationJob], lane: Lane, settings: Settings, *,
           keep_s: int | None = None, also: Callable[[Pipeline], None] | None = None) -> None:
    """Enqueue `jobs` (all of one pool) on that pool's `lane` as plain JSON, by the job function's dotted name,
    all or none, if the lane's admission bound holds them (api/jobs/admission.py); else OverloadedError (429).

    RQ keeps each job's outcome (the `done` event's data is its result) for `keep_s` seconds (BACKLOG_TTL_S by
    default), which may outlive the events' backlog. `also` adds the caller's writes to the same transaction.
    """
    keep_s = keep_s or settings.backlog_ttl_s
    meta = tracking.start(jobs)
    data = [Queue.prepare_data(JOB_FUNCTION, kwargs={"payload": job.model_dump(mode="json")}, job_id=job.job_id,
                               timeout=settings.job_timeout_s, result_ttl=keep_s, failure_ttl=keep_s,
                               description=describe(job), meta=meta,
                               retry=retry_policy(settings))  # a job whose worker dies resumes on another
            for job in jobs]

    def writes(pipe: Pipeline) -> None:
        tracking.claim(pipe, "job", [job.job_id for job in jobs], settings)  # the owner, with the jobs
        if also is not None:
            also(pipe)

    enqueue_within_bound(connection, jobs[0].backend, lane, data, settings, writes)
    tracking.enqueued(jobs)


def describe(job: GenerationJob) -> str:
    """RQ's description of a job; its default would repeat every prompt id, so keep the job hash small."""
    return f"{job.kind.value} {len(job.prompt_ids)} prompt tokens on {job.backend}"
