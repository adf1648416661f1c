"""Admission control: every lane of every pool holds a bounded amount of work; past it, a fast, honest 429.

A lane's work is its queued jobs plus those its workers run (RQ's started registry). It may hold what the
pool's live workers run at once in that lane (their advertised slots, shared/lanes.py) plus an allowance of
waiting jobs, so that an admitted request starts within about MAX_QUEUE_WAIT_S:
- MAX_QUEUED when set;
- interactive work: as many as the workers' running jobs that end within MAX_QUEUE_WAIT_S, by the workers'
  own reckoning (`ENDINGS_FIELD`: each job's steps left at most, times the recent step time). Jobs that
  started together end together: a lane's average rate would admit jobs that then wait for a whole
  generation (measured: first tokens of 9 s at p95 with 200 clients on 32 slots);
- otherwise (beam and scoring jobs, workers that advertise no endings) what the lane's recent rate of ending
  jobs starts within MAX_QUEUE_WAIT_S (one per 32 slots until the lane has a rate).
The batch lane's allowance is MAX_QUEUED_BATCH: batches are meant to wait. A refused request gets
`Retry-After`: when the job it would have been ends, less MAX_QUEUE_WAIT_S, or how long the lane's recent rate
takes to make room for it, scattered so that a crowd refused together does not come back together (`spread`).

The check and the enqueue are one optimistic transaction (WATCH on the lane's queue and started registry),
so concurrent API processes and threads never admit more than the bound between them.
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass

import redis
from redis.client import Pipeline
from redis.exceptions import WatchError
from rq import Queue
from rq.queue import EnqueueData
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from shared.exceptions import NoWorkerError, OverloadedError
from shared.lanes import (
    Lane,
    count_finished,
    finish_rate,
    lane_slots,
    queue_name,
    read_pools,
)
from shared.settings import Settings

FIRST_ALLOWANCE_SHARE = 32
"""Before a lane has a recent rate (a cold start), it may hold one job waiting per this many slots (at least
one): a job that waits for a slot without a known rate may wait a whole generation, so few should."""

UNKNOWN_RATE_RETRY_S = 5
"""Retry-After for a full lane that has ended no job in the last minute (its rate is unknown)."""

MAX_RETRY_AFTER_S = 60
"""The longest Retry-After sent: estimates further out are guesses."""

RETRY_JITTER = 0.5
"""Each Retry-After is scattered over this share of itself either way (`spread`)."""

ENQUEUE_LOCK = threading.Lock()
"""One admission transaction at a time in this process. Concurrent WATCHes of one lane fail all but one, so a
burst of n requests would cost O(n^2) round trips in retries, each pinning a pooled connection meanwhile (a
burst of 30 once exhausted a process's pool for 5 s); across processes the WATCH still keeps the bound."""


@dataclass(frozen=True, slots=True)
class LaneBound:
    """How much work a pool's lane may hold now, how much it holds, and how fast it has been ending jobs."""

    queue: str
    workers: int  # live workers of the pool, starting ones included
    capacity: int  # jobs the pool's live workers run at once in this lane
    bound: int  # capacity plus the jobs allowed to wait
    held: int  # jobs queued or running in the lane
    rate: float | None  # jobs ended per second over the last minute (None: none ended)
    endings: tuple[float, ...] | None = None  # seconds until each running job ends (interactive lane), soonest first
    wait_s: float = 0.0  # how long an admitted job may wait to start, with `endings`

    def retry_after_s(self, held: int, asked: int) -> float:
        """Seconds until the lane likely has room for `asked` more jobs beside the `held` ones."""
        waiting = held + asked - self.capacity  # the place in the queue the last of them would take
        if self.endings is not None and 0 < waiting <= len(self.endings) and self.endings[waiting - 1] < math.inf:
            seconds = self.endings[waiting - 1] - self.wait_s  # it would be admitted then
        elif self.rate:
            seconds = (held + asked - self.bound) / self.rate
        else:
            seconds = UNKNOWN_RATE_RETRY_S
        return min(MAX_RETRY_AFTER_S, max(1.0, seconds))


def lane_bound(connection: redis.Redis, pool: str, lane: Lane, settings: Settings) -> LaneBound:
    """The bound on `pool`'s `lane` now, from its live workers' slots and its recent throughput, and the work it
    holds: two Redis round trips, so that a refusal is cheap even when the workers keep every core busy."""
    queue = queue_name(pool, lane)

    def reads(pipe: Pipeline) -> None:
        count_finished(pipe, queue)
        pipe.llen(Queue(queue, connection=connection).key)
        pipe.zrange(started_key(connection, queue), 0, -1)
        pipe.zcard(started_key(connection, queue_name(pool, Lane.BATCH)))  # running batch items

    fallback = lane_slots(settings.max_batch_size, settings.batch_lane_slots)
    pools, (ended, queued, started, batch_running) = read_pools(connection, [pool], fallback, reads)
    running = len(started)
    workers = [worker.slots for worker in pools[pool]]
    endings = None
    if lane is Lane.INTERACTIVE and all(worker.endings is not None for worker in pools[pool] if not worker.starting):
        endings = running_endings(started, [worker.endings or {} for worker in pools[pool]])
    capacity = sum(slots.get(lane.value, 0) for slots in workers)
    if lane is Lane.INTERACTIVE:  # running batch items hold some of the same slots
        capacity -= min(sum(slots.get(Lane.BATCH.value, 0) for slots in workers), batch_running)
    rate = finish_rate(ended)
    if lane is Lane.BATCH:
        allowance = settings.max_queued_batch
    elif settings.max_queued:
        allowance = settings.max_queued
    elif endings is not None:
        allowance = sum(seconds <= settings.max_queue_wait_s for seconds in endings)
    elif rate:
        allowance = max(1, round(rate * settings.max_queue_wait_s))
    else:
        allowance = max(1, capacity // FIRST_ALLOWANCE_SHARE)
    capacity = max(capacity, 0)
    return LaneBound(queue, len(workers), capacity, capacity + allowance, queued + running, rate,
                     endings if lane is Lane.INTERACTIVE and not settings.max_queued else None,
                     settings.max_queue_wait_s)


def running_endings(started: list[bytes], advertised: list[dict[str, float]]) -> tuple[float, ...]:
    """Seconds until each job of RQ's started registry (`job id:execution id` entries) ends, soonest first, from
    what the workers advertise. A job its worker has not advertised yet has only just started: it ends last."""
    by_job = {job_id: seconds for jobs in advertised for job_id, seconds in jobs.items()}
    ids = [(entry.decode() if isinstance(entry, bytes) else entry).split(":", 1)[0] for entry in started]
    return tuple(sorted(by_job.get(job_id, math.inf) for job_id in ids))


def started_key(connection: redis.Redis, queue: str) -> str:
    """The key of RQ's started registry of `queue` (jobs running on a worker), read without its cleanup."""
    return StartedJobRegistry(queue, connection=connection).key


def enqueue_within_bound(connection: redis.Redis, pool: str, lane: Lane, jobs: list[EnqueueData],
                         settings: Settings, also: Callable[[Pipeline], None] | None = None) -> None:
    """Enqueue `jobs` (all or none) on `pool`'s `lane` if its bound holds them, else raise OverloadedError (429);
    NoWorkerError (503) when the pool has no live worker, starting or ready, so nobody waits on a queue nobody
    reads. `also` adds the caller's own writes (a batch's record, the jobs' owner) to the same transaction.
    """
    limit = lane_bound(connection, pool, lane, settings)
    if not limit.workers:
        raise NoWorkerError(f"no live worker in the '{pool}' pool")
    if limit.held + len(jobs) > limit.bound:  # refused on the first look: no transaction needed
        raise refusal(limit, pool, lane, limit.held, len(jobs))
    queue = Queue(limit.queue, connection=connection, serializer=JSONSerializer)
    started = started_key(connection, limit.queue)
    with ENQUEUE_LOCK, connection.pipeline() as pipe:
        while True:
            try:
                pipe.watch(queue.key, started)
                held = pipe.llen(queue.key) + pipe.zcard(started)
                if held + len(jobs) > limit.bound:
                    raise refusal(limit, pool, lane, held, len(jobs))
                pipe.multi()
                if also is not None:
                    also(pipe)
                queue.enqueue_many(jobs, pipeline=pipe)
                pipe.execute()
                return
            except WatchError:  # a job joined or left the lane meanwhile: look again
                continue


def refusal(limit: LaneBound, pool: str, lane: Lane, held: int, asked: int) -> OverloadedError:
    """The 429 for a lane that cannot take `asked` more jobs."""
    waiting = max(held - limit.capacity, 0)
    what = "jobs" if asked > 1 else "job"
    return OverloadedError(
        f"the '{pool}' pool is busy: its {lane.value} work is at its bound ({limit.capacity} running at once, "
        f"{waiting} waiting, room for {max(limit.bound - held, 0)} more {what}; {asked} asked); "
        f"retry after the Retry-After header's seconds",
        retry_after_s=spread(limit.retry_after_s(held, asked)))


def spread(seconds: float) -> float:
    """`seconds` scattered over +-RETRY_JITTER of itself: a crowd refused together must not come back together, to
    find the lane full again and leave it idle afterwards."""
    return seconds * random.uniform(1 - RETRY_JITTER, 1 + RETRY_JITTER)
