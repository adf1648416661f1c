"""An RQ worker that keeps a running batch: jobs join and leave between decode steps.

Built on RQ's `SimpleWorker` (no fork: torch's thread pool deadlocks in a forked child and CUDA cannot
start in one). RQ's own loop blocks for the first job and calls `execute_job`; from there this worker
takes more jobs without blocking whenever a slot is free (so other workers of the pool get the rest),
steps the engine, publishes every token, and settles each job through RQ's own bookkeeping, so the
started / finished / failed / canceled registries and heartbeats stay right. Cancellation and job
timeouts are checked between steps, since nothing can interrupt a job running in-process.

Beam search and scoring jobs run in the same batch, as groups of rows (`workers/engine/groups.py`).

One job's failure is that job's alone: an exception in its admission, in its own part of an engine step
(`workers/engine/engine.py`: its prefill, sampling, a beam search's choices...) or in building its result fails
it with an `internal_error` event while the other jobs go on. Only the engine's shared decode pass, which no
single job owns, fails the jobs in the engine together.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import statistics
import sys
import time
from collections import deque
from dataclasses import dataclass

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq import worker_registration
from rq.executions import Execution
from rq.job import Job
from rq.queue import Queue
from rq.serializers import JSONSerializer
from rq.timeouts import JobTimeoutException
from rq.utils import now
from rq.worker import SimpleWorker, WorkerStatus

from shared import logs
from shared.events import Event, cancel_key, publish_many, read_backlog
from shared.exceptions import ConfigurationError, ServiceError, ValidationError
from shared.lanes import (
    ENDINGS_EVERY_S,
    ENDINGS_FIELD,
    LANE_SLOTS_FIELD,
    LANES,
    STARTING,
    Lane,
    endings_field,
    lane_of,
    lane_slots,
    queue_name,
    record_finished,
)
from shared.model_files import force_offline
from shared.protocol import DoneEvent, ErrorBody, GenerationJob, JobEvent, TokenEvent, Usage
from shared.recovery import forget_executions
from shared.settings import Settings
from shared.tokenizer import load_tokenizer
from workers.engine.decoder import Decoder
from workers.engine.device_failure import DEVICE_FAILURE_EXIT, is_device_failure
from workers.engine.engine import Engine, EngineJob
from workers.engine.sequence import FinishReason, Sequence, Update
from workers.features.group_jobs import GROUP_JOBS, BeamJob, ScoreJob, load_reranker
from workers.features.reranker import Reranker
from workers.liveness import Liveness
from workers.metrics import MeteredEngine, MeteredPublisher, WorkerMetrics

REDIS_DOWN = (RedisConnectionError, RedisTimeoutError)

STEP_TIMES_KEPT = 64
"""Recent engine steps whose mean is the step time `advertise_endings` counts with: a mean, prefills and slow
steps included, since the steps to come will have their share of them (a median was 40% short)."""

REDIS_RETRY_MAX_S = 2.0
"""Longest wait between two tries to reach Redis while it is gone, so a worker serves within seconds of its return."""



def job_log_ids(worker, item, *args, **kwargs) -> dict[str, str | None]:
    """The ids a worker's log lines about a job carry: the job's, and the request's that created it."""
    job = item.job if isinstance(item, RunningJob) else item
    return {"job_id": job.id, "request_id": (job.meta or {}).get("request_id")}


class ResumeError(Exception):
    """A job handed back by a dead worker that cannot go on from where it stopped."""


class QueueDeadlineError(Exception):
    """A job that waited in its queue longer than its queue deadline: its client has likely given up."""


@dataclass(slots=True)
class RunningJob:
    """An RQ job admitted into the batch, with what is needed to publish and settle it."""

    job: Job
    queue: Queue
    lane: Lane
    execution: Execution
    publisher: MeteredPublisher
    sequence: EngineJob | None  # what the engine runs: a generation's sequence, a beam or scoring job's group
    started: float
    timed_out: bool = False
    task: BeamJob | ScoreJob | None = None  # a beam or scoring job, which builds its events from its group


class BatchingWorker(SimpleWorker):
    """Continuous batching inside one RQ worker process. Subclasses say how to build the decoder."""

    max_connection_wait_time = REDIS_RETRY_MAX_S  # RQ's idle loop backs off up to 60 s by default

    def __init__(self, *args, settings: Settings | None = None, **kwargs):
        kwargs["serializer"] = JSONSerializer  # payloads are JSON; never unpickle what is in Redis
        self.settings = settings or Settings.from_env()
        kwargs.setdefault("worker_ttl", self.settings.worker_dead_s)
        super().__init__(*args, **kwargs)
        self.listen_to_lanes()
        self.engine: Engine | None = None
        self.reranker: Reranker | None = None  # None: no reranker files; jobs that need one fail `unavailable`
        self.running: dict[str, RunningJob] = {}
        self.liveness: Liveness | None = None
        self.draining_since: float | None = None  # monotonic time of the SIGTERM that started a drain
        self.hand_back_now = False  # a second signal: hand the running jobs back without waiting
        self.metrics = WorkerMetrics()  # pushed to Redis by the liveness thread (workers/metrics.py)
        self.step_times: deque[float] = deque(maxlen=STEP_TIMES_KEPT)  # recent steps' seconds (`advertise_endings`)
        self.last_step_at: float | None = None  # when this batch's previous step started
        self.endings_written = (0.0, 0)  # when the endings were last advertised, and for how many running jobs

    def listen_to_lanes(self) -> None:
        """`rq worker cpu` listens on every lane of pool `cpu` (shared/lanes.py), interactive work first."""
        names = [queue_name(queue.name, lane) if lane_of(queue.name) is Lane.INTERACTIVE else queue.name
                 for queue in self.queues for lane in LANES]
        names = list(dict.fromkeys(names))  # a queue named twice (`rq worker cpu cpu:batch`) is listened to once
        self.queues = [self.queue_class(name, connection=self.connection, job_class=self.job_class,
                                        serializer=self.serializer, death_penalty_class=self.death_penalty_class)
                       for name in names]
        self._ordered_queues = self.queues[:]

    def lane_slots(self) -> dict[Lane, int]:
        """Jobs of each lane this worker runs at once (shared/lanes.py); known from its settings before it loads."""
        size = self.engine.decoder.max_batch_size if self.engine is not None else self.settings.max_batch_size
        return lane_slots(size, self.settings.batch_lane_slots)

    def build_decoder(self) -> Decoder:
        """The pool's decoder with its weights loaded."""
        raise NotImplementedError

    def load_engine(self) -> Engine:
        """Load the tokenizer and decoder once, before the first job."""
        force_offline()
        return self.engine_for(self.build_decoder())

    def engine_for(self, decoder: Decoder) -> Engine:
        """An empty batching engine on `decoder`, with the worker's limits."""
        tokenizer = load_tokenizer(self.settings.model_dir)
        return MeteredEngine(decoder, tokenizer.backend, tokenizer.eos_token_ids, metrics=self.metrics,
                             prefill_chunk=self.settings.prefill_chunk,
                             max_tokens_in_flight=self.settings.max_tokens_in_flight,
                             max_yielding_rows=lane_slots(decoder.max_batch_size,
                                                          self.settings.batch_lane_slots)[Lane.BATCH])

    def work(self, *args, **kwargs) -> bool:
        logs.configure(self.settings)  # LOG_FORMAT for our lines and RQ's
        if self.engine is None:
            self.load_while_starting()
        else:  # loaded by the caller (tests): RQ's bootstrap registers it, then the thread beats
            self.liveness = Liveness(self)
            self.liveness.start()
        try:
            return super().work(*args, **kwargs)
        finally:
            self.liveness.stop()

    def load_while_starting(self) -> None:
        """Load the model and the reranker while registered as `starting` (shared/lanes.py): requests for the
        pool wait in its queue meanwhile instead of being refused, and no job is taken (RQ's loop starts after).
        The liveness thread beats from the start, so a worker that dies while loading stops counting within
        WORKER_DEAD_S; one that is stopped or fails leaves RQ's worker sets at once. RQ's bootstrap then
        registers it again, ready."""
        started = time.monotonic()
        self.register_birth()
        self.liveness = Liveness(self)
        self.liveness.start()
        self.log.info("Worker %s: starting (registered; loading the model, jobs wait in the queue)", self.name)
        previous_sigterm = signal.signal(signal.SIGTERM, self.stop_while_starting)
        try:
            self.engine = self.load_engine()
            self.log.info("Worker %s: model loaded, batch of up to %d", self.name, self.engine.decoder.max_batch_size)
            self.reranker = self.load_reranker()
        except BaseException as exc:
            self.liveness.stop()
            with contextlib.suppress(*REDIS_DOWN):  # without Redis the record expires within WORKER_DEAD_S
                self.register_death()
            if isinstance(exc, ConfigurationError):
                raise SystemExit(f"{self.name}: {exc}") from exc
            raise
        finally:
            signal.signal(signal.SIGTERM, previous_sigterm)
        self.log.info("Worker %s: ready after %.1f s", self.name, time.monotonic() - started)

    def stop_while_starting(self, signum, frame) -> None:
        """SIGTERM while loading: nothing runs yet, so leave at once (RQ's drain starts with its loop)."""
        raise SystemExit(f"{self.name}: stopped while loading the model")

    def load_reranker(self) -> Reranker | None:
        """The beam and scoring jobs' reranker, loaded now rather than mid-batch (which stalled every stream);
        None when its files are not installed: the worker serves on without it."""
        try:
            reranker = load_reranker()
        except ConfigurationError as exc:
            self.log.warning("Worker %s: no reranker (%s); beam jobs with use_rerank and scoring jobs will fail "
                             "with `unavailable`", self.name, exc)
            return None
        self.log.info("Worker %s: reranker loaded from %s", self.name, reranker.folder)
        return reranker

    # -- liveness: RQ's heartbeats, with WORKER_DEAD_S as every TTL (workers/liveness.py refreshes them) ----

    def heartbeat(self, timeout: int | None = None, pipeline=None) -> None:
        super().heartbeat(self.settings.worker_dead_s, pipeline=pipeline)

    def register_birth(self) -> None:
        """Enter RQ's worker sets with RQ's record of a worker plus ours, in one transaction (no reader sees a
        partial record): the lanes' slots, which the API's admission bound reads, and while the model loads the
        state `starting`. The key lives WORKER_DEAD_S (RQ gives a newborn worker_ttl + 60 s). Called before
        loading, by RQ's bootstrap once loaded (replacing the starting record), and by `ensure_registered`."""
        first = self.birth_date is None
        if first and self.connection.exists(self.key) and not self.connection.hexists(self.key, "death"):
            raise ValueError(f"There exists an active worker named {self.name!r} already")  # as RQ's own check
        self.birth_date = self.last_heartbeat = now()
        slots = {lane.value: n for lane, n in self.lane_slots().items()}
        record = {**self.serialize(), LANE_SLOTS_FIELD: json.dumps(slots), ENDINGS_FIELD: endings_field({})}
        if self.engine is None:
            record["state"] = STARTING
        with self.connection.pipeline() as pipe:
            pipe.delete(self.key)
            pipe.hset(self.key, mapping=record)
            worker_registration.register(self, pipe)
            pipe.expire(self.key, self.settings.worker_dead_s)
            pipe.execute()

    def ensure_registered(self) -> None:
        """Register again if this worker's record is gone (Redis restarted empty, or the worker was frozen
        past WORKER_DEAD_S and counted dead): a live worker must be seen, and routed to, again."""
        if self.birth_date is None or self.draining_since is not None:
            return  # not registered yet, or leaving on purpose
        if not self.connection.hexists(self.key, "birth"):
            self.log.warning("Worker %s: its registration had lapsed; registering again", self.name)
            self.register_birth()

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return self.settings.worker_dead_s

    # -- the batch loop ------------------------------------------------------------------------------

    def execute_job(self, job: Job, queue: Queue) -> None:
        """Run `job` and every job that joins it until the batch is empty."""
        self.last_step_at = None  # (the time since the last batch's steps is idle, not a step)
        self.admit(job, queue, from_intermediate=len(self._ordered_queues) == 1)
        try:
            while self.engine.has_work:
                if self.drain_is_over():
                    self.hand_back()
                    break
                if not self._stop_requested:
                    self.admit_queued_jobs()
                self.check_cancellations()
                if self.engine.has_work:
                    self.step_engine()
                self.advertise_endings()
        except REDIS_DOWN as exc:  # nothing can be published now: leave the jobs to recovery, wait, serve on
            self.log.error("Worker %s: Redis stopped answering mid-batch (%s); %d running jobs are left to "
                           "recovery", self.name, exc, len(self.running))
            self.running.clear()
            self.engine = self.engine_for(self.engine.decoder)
            self.wait_for_redis()
        except Exception as exc:  # a bug in a step must not strand clients: fail what is running, keep serving
            if is_device_failure(exc):
                self.exit_for_broken_device(exc)
            self.log.exception("Worker %s: batch step failed", self.name)
            for entry in list(self.running.values()):
                self.fail(entry, "internal_error", "the worker failed while generating", sys.exc_info())
            self.engine = self.engine_for(self.engine.decoder)  # the model stays loaded
        finally:
            with contextlib.suppress(*REDIS_DOWN):
                self.advertise_endings()  # nothing runs now (or it was left to recovery)
            self.set_state(WorkerStatus.IDLE)

    def advertise_endings(self) -> None:
        """Tell the API's admission when each running interactive job will have ended at the latest
        (`ENDINGS_FIELD`): the steps it has left if it runs to max_tokens, times the recent step time. Every
        ENDINGS_EVERY_S, and at once when the number of running jobs changes."""
        clock = time.monotonic()
        written_at, count = self.endings_written
        if clock - written_at < ENDINGS_EVERY_S and count == len(self.running):
            return
        step_s = statistics.fmean(self.step_times) if self.step_times else 0.0
        jobs = {job_id: entry.sequence.steps_left * step_s for job_id, entry in self.running.items()
                if entry.sequence and entry.lane is Lane.INTERACTIVE}
        self.connection.hset(self.key, ENDINGS_FIELD, endings_field(jobs))
        self.endings_written = (clock, len(self.running))

    def step_engine(self) -> None:
        """One engine step, published. The engine fails a job whose own work raised by itself (see `settle`);
        what still escapes it is the decode step's one forward pass over every running row, which no single job
        can be blamed for: the engine's jobs fail and the engine is rebuilt (the model stays loaded)."""
        started = time.perf_counter()
        if self.last_step_at is not None:  # a step's time is all the loop does around it: admitting, settling too
            self.step_times.append(started - self.last_step_at)
        self.last_step_at = started
        try:
            updates = self.engine.step()
        except Exception as exc:  # noqa: BLE001
            if is_device_failure(exc):
                self.exit_for_broken_device(exc)
            self.log.exception("Worker %s: a batch step failed; its jobs fail", self.name)
            for entry in list(self.running.values()):
                self.fail(entry, "internal_error", "the worker failed while generating", sys.exc_info())
            self.engine = self.engine_for(self.engine.decoder)
            return
        self.publish(updates)

    def exit_for_broken_device(self, error: BaseException) -> None:
        """A CUDA error broke this process's device context: no job can run here any more, and none is to blame.

        Exit at once, non-zero, settling nothing: the running jobs stay in RQ's started registry, their
        heartbeats lapse within WORKER_DEAD_S, and recovery resumes them on another worker from their backlogs
        (each such death counts against MAX_RECOVERIES, so a job that breaks every GPU ends as `job_lost`). The
        supervisor (systemd, compose, Kubernetes) starts a fresh process, which gets a fresh context."""
        self.log.critical("Worker %s: the device failed (%s: %s); exiting with status %d so its supervisor restarts "
                          "it; its %d running jobs resume on another worker", self.name, type(error).__name__, error,
                          DEVICE_FAILURE_EXIT, len(self.running), exc_info=error)
        self.liveness.stop()
        with contextlib.suppress(*REDIS_DOWN):
            worker_registration.unregister(self)  # routing and /health stop counting it now
            self.register_death()
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(DEVICE_FAILURE_EXIT)  # not SystemExit: cleanups that touch the broken device could hang

    def wait_for_redis(self) -> None:
        """Block until Redis answers again, retrying every REDIS_RETRY_MAX_S at most."""
        wait_s = 0.25
        while True:
            try:
                self.connection.ping()
                self.log.warning("Worker %s: Redis answers again", self.name)
                return
            except REDIS_DOWN:
                time.sleep(wait_s)
                wait_s = min(2 * wait_s, REDIS_RETRY_MAX_S)

    # -- draining: SIGTERM (a redeploy, a scale-down) ------------------------------------------------------

    def request_stop(self, signum, frame) -> None:
        """Drain: at once stop counting as live and take no more jobs, finish the running ones for up to
        DRAIN_S, then hand the rest back. RQ's warm shutdown does the middle part; RQ sends a second signal
        to `request_force_stop`."""
        self.log.warning("Worker %s: draining for up to %.0f s (a second signal hands jobs back now)", self.name,
                         self.settings.drain_s)
        self.draining_since = time.monotonic()
        worker_registration.unregister(self)  # /health and routing stop counting it now
        super().request_stop(signum, frame)

    def request_force_stop(self, signum, frame) -> None:
        """A second SIGTERM or SIGINT: hand the running jobs back at the next step, then exit."""
        self.hand_back_now = True

    def drain_is_over(self) -> bool:
        """Whether a drain has run out of time (or was cut short) with jobs still running."""
        if self.draining_since is None:
            return False
        return self.hand_back_now or time.monotonic() - self.draining_since >= self.settings.drain_s

    def hand_back(self) -> None:
        """Put every running job back at the front of its queue; another worker resumes it where it stopped
        (the events sent so far stay in its backlog), as after a worker's death but without the wait."""
        for entry in list(self.running.values()):
            self.running.pop(entry.job.id)
            self.drop(entry)
            entry.queue.enqueue_job(entry.job, at_front=True)
            self.log.warning("Worker %s: handed job %s back to the %s queue", self.name, entry.job.id,
                             entry.queue.name)
        self.engine = self.engine_for(self.engine.decoder)

    def admit_queued_jobs(self) -> None:
        """Take queued jobs without blocking, from every lane that has room now, interactive work first."""
        while queues := self.lanes_with_room():
            result = self.queue_class.dequeue_any(
                queues, None, connection=self.connection, job_class=self.job_class,
                serializer=self.serializer, death_penalty_class=self.death_penalty_class)
            if result is None:
                return
            self.admit(*result, from_intermediate=len(queues) == 1)

    def lanes_with_room(self) -> list[Queue]:
        """The queues (in lane order) whose next job this worker would start at once.

        Every job needs the engine to want one more (a row, and a place in the next prefill; for the side and
        batch lanes, within the rows such work may hold); a beam or scoring job also one of the side lane's
        places, a batch item one of the batch lane's slots.
        """
        slots = self.lane_slots()
        running = {lane: 0 for lane in LANES}
        for entry in self.running.values():
            running[entry.lane] += 1
        yielding = self.engine.wants_more()
        room = {Lane.INTERACTIVE: self.engine.wants_more(urgent=True),
                Lane.SIDE: yielding and running[Lane.SIDE] < slots[Lane.SIDE],
                Lane.BATCH: yielding and running[Lane.BATCH] < slots[Lane.BATCH]}
        return [queue for queue in self._ordered_queues if room[lane_of(queue.name)]]

    @logs.for_job(job_log_ids)
    def admit(self, job: Job, queue: Queue, *, from_intermediate: bool = False) -> None:
        """Start `job` in RQ's registries and hand its sequence (a beam or scoring job: its group) to the engine.

        `from_intermediate`: RQ moved the job to its intermediate queue (a dequeue from one queue does).
        """
        waited_s = (now() - job.enqueued_at).total_seconds() if job.enqueued_at else 0.0
        execution = self.prepare_execution(job)
        self.prepare_job_execution(job, remove_from_intermediate_queue=from_intermediate)
        job.started_at = now()
        publisher = MeteredPublisher(self.connection, job, self.settings.backlog_ttl_s, self.metrics)
        lane = lane_of(queue.name)
        entry = RunningJob(job, queue, lane, execution, publisher, sequence=None, started=time.monotonic())
        try:
            payload = GenerationJob.model_validate(job.kwargs["payload"])
            sent = self.events_already_sent(entry)
            if sent and sent[-1].terminal:  # it ended after all (say, cancelled while requeued): nothing to run
                self.drop(entry)
                return
            deadline = payload.queue_deadline_s
            if not sent and deadline and waited_s > deadline:
                raise QueueDeadlineError(f"the job waited {waited_s:.1f} s in the '{queue.name}' queue, past its "
                                         f"queue deadline of {deadline:g} s (queue_deadline_s); it was not started")
            resumed = [TokenEvent.model_validate(event.data).token for event in sent if event.type == "token"]
            if payload.kind in GROUP_JOBS:
                if sent:
                    raise ResumeError("its worker died while publishing its result; a beam search or scoring job "
                                      "cannot resume from part of its events (send it again)")
                entry.task = GROUP_JOBS[payload.kind](payload, self.engine, self.reranker)
                entry.sequence = entry.task.group
            else:
                entry.sequence = Sequence(job.id, payload.prompt_ids, payload.sampling, self.engine.tokenizer)
            self.engine.add(entry.sequence, resumed, yields=lane is Lane.BATCH)
        except ResumeError as exc:
            self.fail(entry, "job_lost", str(exc), sys.exc_info())
            return
        except QueueDeadlineError as exc:
            self.fail(entry, "queue_timeout", str(exc), sys.exc_info(), held_a_slot=False)
            return
        except (KeyError, TypeError, ValueError, ValidationError) as exc:
            self.fail(entry, "invalid_job", str(exc), sys.exc_info())
            return
        except ServiceError as exc:  # say, a beam job with use_rerank on a worker without a reranker
            self.fail(entry, exc.error_type, exc.message, sys.exc_info())
            return
        except REDIS_DOWN:
            raise
        except Exception as exc:  # noqa: BLE001 (a bug met by this job alone fails it alone)
            if is_device_failure(exc):
                self.running[job.id] = entry  # not failed: resumed elsewhere with the others
                self.exit_for_broken_device(exc)
            self.fail_alone(entry, exc)
            return
        self.running[job.id] = entry

    def events_already_sent(self, entry: RunningJob) -> list[Event]:
        """The events a job published before its worker died (none for a new job); numbering goes on after them."""
        sent = read_backlog(self.connection, entry.job.id)
        entry.publisher.next_id = len(sent) + 1
        if sent:
            self.log.warning("Worker %s: job %s resumes after %d events (its previous worker died)", self.name,
                             entry.job.id, len(sent))
        self.metrics.admitted(entry.job, entry.publisher, sent)
        return sent

    def check_cancellations(self) -> None:
        """Cancel sequences whose client left or asked to stop, and those past their job timeout."""
        if not self.running:
            return
        ids = list(self.running)
        flags = self.connection.mget([cancel_key(job_id) for job_id in ids])
        clock = time.monotonic()
        for job_id, flag in zip(ids, flags):
            entry = self.running[job_id]
            timeout = entry.job.timeout
            timed_out = bool(timeout and timeout > 0 and clock - entry.started > timeout)
            if not (timed_out or flag is not None):
                continue
            entry.timed_out = timed_out
            self.engine.cancel(job_id)  # ends at the next step, through settle()

    # -- publishing and settling ---------------------------------------------------------------------

    def publish(self, updates: list[Update]) -> None:
        """Send this step's token events in one round trip, then settle finished jobs.

        A job is settled in RQ before its terminal event is published, so a client that has seen
        `done` or `error` always finds the job finished, failed or canceled in RQ.
        """
        events = []
        for update in updates:
            if update.token is not None:
                token = TokenEvent(token=update.token, text=update.text, index=update.index)
                events.append((self.running[update.sequence.id].publisher, token))
        publish_many(self.connection, events)
        if self.settings.crash_after_tokens and any(u.index + 1 >= self.settings.crash_after_tokens for u in updates):
            os._exit(137)  # test-only fault hook (CRASH_AFTER_TOKENS): die as a SIGKILL would, nothing cleaned up
        for update in updates:
            if update.finished:
                self.settle(self.running[update.sequence.id])

    def result(self, entry: RunningJob) -> list[JobEvent]:
        """The events that end a finished job: a sequence's `done`; a beam or scoring job's from its group."""
        if entry.task is not None:
            return entry.task.events()
        sequence = entry.sequence
        return [DoneEvent(job_id=entry.job.id, output_text=sequence.output_text, output_ids=sequence.output_ids,
                          finish_reason=sequence.finish_reason.value,
                          usage=Usage(prompt_tokens=len(sequence.prompt_ids),
                                      completion_tokens=len(sequence.output_ids)))]

    @logs.for_job(job_log_ids)
    def succeed(self, entry: RunningJob, done: DoneEvent) -> None:
        """Mark the job finished in RQ (the `done` event's data is its result), then publish `done`."""
        self.running.pop(entry.job.id, None)
        self._finalize_success(entry.job, entry.queue, entry.execution, done.model_dump(mode="json"))
        self.log_ended(entry)
        entry.publisher.publish(done)

    @logs.for_job(job_log_ids)
    def settle(self, entry: RunningJob) -> None:
        """Record a finished sequence's outcome in RQ: finished, failed (its own work raised, or a timeout) or
        canceled."""
        sequence = entry.sequence
        if sequence.finish_reason == FinishReason.FAILED:
            self.fail_alone(entry, sequence.error)
        elif sequence.finish_reason != FinishReason.CANCELLED:
            self.finish(entry)
        elif entry.timed_out:
            self.fail_timed_out(entry)
        else:
            self.cancel(entry)

    def finish(self, entry: RunningJob) -> None:
        """Publish a finished job's result events and mark it finished; a failure building them (a beam job's
        reranking, say) fails the job alone."""
        try:
            events = self.result(entry)
        except Exception as exc:  # noqa: BLE001 (the job's own work: nothing else is touched)
            self.fail_alone(entry, exc)
            return
        publish_many(self.connection, [(entry.publisher, event) for event in events if not event.terminal])
        self.succeed(entry, next(event for event in events if event.terminal))

    @logs.for_job(job_log_ids)
    def fail_timed_out(self, entry: RunningJob) -> None:
        """Fail a job that ran past its RQ timeout, as RQ's own death penalty would."""
        try:
            raise JobTimeoutException(f"job exceeded its timeout of {entry.job.timeout} s")
        except JobTimeoutException as exc:
            self.fail(entry, "timeout", str(exc), sys.exc_info())

    @logs.for_job(job_log_ids)
    def fail(self, entry: RunningJob, error_type: str, message: str, exc_info, *, held_a_slot: bool = True) -> None:
        """Publish an `error` event and mark the job failed in RQ (never retried: its retries are for recovery).

        A job that never `held_a_slot` (it failed before it could start) does not count in the lane's
        throughput: it freed no room for the next one."""
        self.running.pop(entry.job.id, None)
        entry.job.retries_left = 0
        self._finalize_failure(entry.job, entry.queue, entry.execution, exc_info)
        if held_a_slot:
            self.log_ended(entry)
        entry.publisher.publish(ErrorBody.of(error_type, message))

    def fail_alone(self, entry: RunningJob, error: Exception) -> None:
        """Fail a job whose own work raised `error`; RQ logs the traceback and keeps it with the failed job."""
        self.fail(entry, "internal_error", f"the worker failed on this job ({type(error).__name__})",
                  (type(error), error, error.__traceback__))

    @logs.for_job(job_log_ids)
    def drop(self, entry: RunningJob) -> None:
        """Leave RQ's started registry for a job that has already ended, publishing nothing."""
        with self.connection.pipeline() as pipeline:
            self.cleanup_execution(entry.job, pipeline=pipeline, execution=entry.execution)
            pipeline.execute()

    @logs.for_job(job_log_ids)
    def cancel(self, entry: RunningJob) -> None:
        """Publish a `cancelled` error event and move the job to RQ's canceled registry."""
        self.running.pop(entry.job.id, None)
        self.drop(entry)
        forget_executions(self.connection, entry.job)  # a resumed job's dead executions would fail cancel()
        if not entry.job.is_canceled:  # DELETE may have cancelled it in RQ already
            entry.job.cancel()
        self.log_ended(entry)
        entry.publisher.publish(ErrorBody.of("cancelled", "the job was cancelled"))

    def log_ended(self, entry: RunningJob) -> None:
        """Count the job in its lane's recent throughput, from which the API tells refused clients when to retry."""
        with self.connection.pipeline() as pipe:
            record_finished(pipe, entry.queue.name, entry.job.id)
            pipe.execute()
