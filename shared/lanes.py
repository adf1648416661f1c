"""Lanes: a pool's work split by how long its client can wait, one RQ queue per lane.

A worker of pool `cpu` listens on `cpu` (interactive: a person waits for the first token), `cpu:side` (beam
search and candidate scoring, which take several rows of the batch each) and `cpu:batch` (`/generate_batch`
items, offline work), and takes from them in that order whenever it has room for that lane's work. Batch items
and the rows of beam and scoring jobs may hold only part of a worker's slots together (the batch lane's
slots), so an interactive request always finds one free within a step.

Workers advertise their room per lane in their RQ worker hash (`LANE_SLOTS_FIELD`), when they expect their
running jobs to end (`ENDINGS_FIELD`), and log every job they end (`finished_key`), so the API can bound each
lane's waiting work and tell a refused client when to come back (`api/jobs/admission.py`). A worker
registers while it still loads its model, in the state `starting`: it counts for routing and the bound (its
slots are known from its settings), so requests for its pool wait in the queue instead of being refused, but it
takes no job until it is loaded.
"""

from __future__ import annotations

import enum
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis
from redis.client import Pipeline
from rq import worker_registration

from shared.protocol import GenerationJob, JobKind


class Lane(str, enum.Enum):
    """A class of work with its own queue in every pool."""

    INTERACTIVE = "interactive"  # /generate, /stream, /chat, /v1: the pool's own queue
    SIDE = "side"  # beam search and scoring, MAX_SIDE_TASKS jobs per worker
    BATCH = "batch"  # /generate_batch items: they yield to the other lanes


LANES = (Lane.INTERACTIVE, Lane.SIDE, Lane.BATCH)
"""The order a worker takes work in."""

LANE_SLOTS_FIELD = "llm_lane_slots"
"""Field of a worker's RQ hash: JSON `{lane: jobs it runs at once}`, written when it registers."""

ENDINGS_FIELD = "llm_endings"
"""Field of a worker's RQ hash: JSON `{"at": unix time, "jobs": {job id: seconds}}`, when it expected (at `at`)
each of its running interactive jobs to end: the steps each has left at most (its max_tokens) times the recent
step time. Rewritten a few times a second while it works (`ENDINGS_EVERY_S`), and empty when its batch empties.
Keyed by job so that a reader matches it against RQ's started registry, which changes before it does."""

ENDINGS_EVERY_S = 0.25
"""How often a working worker rewrites its `ENDINGS_FIELD`."""

ENDINGS_STALE_S = 5.0
"""Endings written longer ago than this (a worker frozen mid-batch, say) are not trusted."""

STARTING = "starting"
"""The `state` of a worker's RQ hash while it loads its model (RQ's own name for a worker not yet working)."""

MAX_SIDE_TASKS = 2
"""Beam searches and scoring jobs a worker runs at once. Each holds up to 8 rows of the batch (its width, its
candidates), within the rows the batch lane's slots give yielding work; the API's admission bound counts jobs."""

FINISHED_WINDOW_S = 60
"""How far back the log of ended jobs reaches (the admission bound's throughput is measured over it)."""


def queue_name(pool: str, lane: Lane) -> str:
    """The RQ queue of `lane` in `pool`: the pool's own name for interactive work, `<pool>:<lane>` otherwise."""
    return pool if lane is Lane.INTERACTIVE else f"{pool}:{lane.value}"


def pool_of(queue: str) -> str:
    """The pool a lane's queue belongs to."""
    return queue.split(":", 1)[0]


def lane_of(queue: str) -> Lane:
    """The lane a queue serves."""
    _, _, lane = queue.partition(":")
    return Lane(lane) if lane else Lane.INTERACTIVE


def lane_for(job: GenerationJob, *, batch: bool = False) -> Lane:
    """The lane a job travels in: its kind's, or the batch lane for a /generate_batch item."""
    if job.kind in (JobKind.BEAM, JobKind.SCORE):
        return Lane.SIDE
    return Lane.BATCH if batch else Lane.INTERACTIVE


def lane_slots(max_batch_size: int, batch_lane_slots: int = 0) -> dict[Lane, int]:
    """Jobs of each lane a worker with `max_batch_size` slots runs at once: batch items (with the rows of beam and
    scoring jobs) hold at most BATCH_LANE_SLOTS of them (three quarters by default, never all), so interactive
    work always finds one."""
    batch = batch_lane_slots or (3 * max_batch_size) // 4
    return {Lane.INTERACTIVE: max_batch_size, Lane.SIDE: MAX_SIDE_TASKS,
            Lane.BATCH: max(1, min(batch, max_batch_size - 1))}


@dataclass(frozen=True, slots=True)
class PoolWorker:
    """A live worker of a pool, as its RQ hash describes it."""

    slots: dict[str, int]  # jobs it runs at once, per lane value
    starting: bool  # still loading its model: it counts for routing and the admission bound, takes no job yet
    endings: dict[str, float] | None = None  # seconds from now until each of its running jobs ends, by job id


def pool_workers(connection: redis.Redis, pool: str, fallback: dict[Lane, int] | None = None) -> list[PoolWorker]:
    """Each live worker of `pool`, starting ones included (one Redis round trip after the set read).

    A worker whose key expired (dead for WORKER_DEAD_S) is not listed; RQ drops it from the set later. One that
    does not advertise its slots (started by an older release, say) counts with `fallback`'s.
    """
    return read_pools(connection, [pool], fallback)[0][pool]


def read_pools(connection: redis.Redis, pools: list[str], fallback: dict[Lane, int] | None = None,
               reads: Callable[[Pipeline], None] | None = None) -> tuple[dict[str, list[PoolWorker]], list]:
    """The live workers of each of `pools`, and the results of the commands `reads` queues: two round trips,
    whatever the number of pools and workers (the hot path of every admission and /health). The second is one
    transaction, so counts read together agree (a job moving from a queue to its started registry between two
    reads would count twice)."""
    with connection.pipeline(transaction=True) as pipe:
        for pool in pools:
            pipe.smembers(worker_registration.WORKERS_BY_QUEUE_KEY % pool)
        keys = [sorted(members) for members in pipe.execute()]
        for pool_keys in keys:
            for key in pool_keys:
                pipe.hmget(key, "state", "birth", LANE_SLOTS_FIELD, ENDINGS_FIELD)
        if reads is not None:
            reads(pipe)
        rows = iter(pipe.execute())
    workers = {pool: [worker for worker in (parse_worker(next(rows), fallback) for _ in pool_keys) if worker]
               for pool, pool_keys in zip(pools, keys)}
    return workers, list(rows)


def parse_worker(row: list, fallback: dict[Lane, int] | None) -> PoolWorker | None:
    """A worker from its hash's state, birth, advertised slots and endings; None when it has expired or died."""
    state, birth, slots, endings = row
    state = state.decode() if isinstance(state, bytes) else state
    if birth is None or state == "dead":  # expired (hash gone) or marked dead
        return None
    advertised = json.loads(slots) if slots else {lane.value: n for lane, n in (fallback or {}).items()}
    return PoolWorker({lane: int(n) for lane, n in advertised.items()}, starting=state == STARTING,
                      endings=endings_from(endings))


def endings_from(field: bytes | str | None, clock: float | None = None) -> dict[str, float] | None:
    """Seconds from now until each job ends, by job id, from an `ENDINGS_FIELD` written some time ago; None when
    there is none, or when it is stale (a worker frozen mid-batch: its jobs are not ending as it said)."""
    if not field:
        return None
    try:
        advertised = json.loads(field)
        age = (time.time() if clock is None else clock) - float(advertised["at"])
        jobs = {str(job_id): float(seconds) for job_id, seconds in advertised["jobs"].items()}
    except (ValueError, TypeError, KeyError, AttributeError):  # another release's format: count it as none
        return None
    if jobs and age > ENDINGS_STALE_S:  # (an idle worker's empty record stays true)
        return None
    return {job_id: max(0.0, seconds - max(age, 0.0)) for job_id, seconds in jobs.items()}


def endings_field(jobs: dict[str, float]) -> str:
    """The `ENDINGS_FIELD` value for jobs expected to end in so many seconds from now."""
    return json.dumps({"at": round(time.time(), 3), "jobs": {job_id: round(s, 3) for job_id, s in jobs.items()}})


def record_finished(pipe: Pipeline, queue: str, job_id: str) -> None:
    """Log (on `pipe`) that a job of `queue` has ended now, dropping entries older than the window."""
    key, clock = finished_key(queue), time.time()
    pipe.zadd(key, {job_id: clock})
    pipe.zremrangebyscore(key, "-inf", clock - FINISHED_WINDOW_S)
    pipe.expire(key, 2 * FINISHED_WINDOW_S)


def count_finished(pipe: Pipeline, queue: str) -> None:
    """Queue (on `pipe`) the count of `queue`'s jobs ended within the window; `finish_rate` turns it into a rate."""
    clock = time.time()
    pipe.zcount(finished_key(queue), clock - FINISHED_WINDOW_S, clock)


def finish_rate(ended: int) -> float | None:
    """Jobs ended per second over the last FINISHED_WINDOW_S, from `count_finished`'s count; None when none ended.

    Over the whole window, not since the oldest entry: jobs that started together end together, and a wave
    of 32 ending within a second is not a rate of 32 jobs per second.
    """
    return ended / FINISHED_WINDOW_S if ended else None


def finished_key(queue: str) -> str:
    """Sorted set of the queue's recently ended jobs, scored by when they ended."""
    return f"llm:finished:{queue}"
