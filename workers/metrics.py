"""A worker's metrics, pushed to Redis on every heartbeat and served by the API's `/metrics`.

Two sources feed one registry per worker process:
- `MeteredEngine`: after each step, the batch's size (rows) and KV positions, and the step's duration.
- `MeteredPublisher`: every event a job publishes, which says when its first token went out (time to
  first token), the gaps between its tokens (inter-token latency), its end (end-to-end latency, and why it
  ended) and how many tokens it generated. With the admission of each job (`WorkerMetrics.admitted`): its
  queue wait, its prompt tokens, and whether it was recovered from a dead or draining worker.

Latencies are measured where vLLM measures them, in the serving process, from the job's creation by the
API (RQ's `created_at`; on one host the two clocks are one): the time a request spent being validated and
tokenized before is not in them, the time it waited in the queue is. Why push rather than a port per worker,
and how the snapshots are read: `shared/metrics.py`.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone

import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client import values as prometheus_values
from rq.job import Job

from shared.events import EventPublisher
from shared.metrics import MULTIPROC_ENV, WORKER_SET, worker_key
from shared.protocol import JobEvent
from workers.engine.engine import Engine

# A worker keeps its values in memory and pushes them. A PROMETHEUS_MULTIPROC_DIR in its environment (one .env
# for every process) is the API's: writing files there would add the worker's counts to the API's own.
os.environ.pop(MULTIPROC_ENV, None)
prometheus_values.ValueClass = prometheus_values.get_value_class()
disable_created_metrics()  # `_created` series would double every counter's lines in each snapshot

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 240.0, 480.0, 960.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)


def seconds_since(moment: datetime | None) -> float | None:
    """Wall-clock seconds from an RQ timestamp (UTC) to now, never negative; None without one."""
    if moment is None:
        return None
    return max(0.0, (datetime.now(timezone.utc) - moment).total_seconds())


class WorkerMetrics:
    """The metrics of one worker process, in a registry of its own."""

    def __init__(self):
        self.registry = registry = CollectorRegistry(auto_describe=False)
        self.batch_size = Gauge("llm_worker_batch_size", "Rows of the worker's running batch (a sequence each, a "
                                "beam search one per beam).", registry=registry)
        self.waiting = Gauge("llm_worker_waiting_sequences", "Jobs the worker has taken that wait for their batch "
                             "rows or are being prefilled.", registry=registry)
        self.kv_used = Gauge("llm_worker_kv_positions_used", "KV cache positions holding the tokens of the "
                             "sequences in the batch.", registry=registry)
        self.kv_reserved = Gauge("llm_worker_kv_positions_reserved", "KV positions reserved by the sequences in "
                                 "the batch (prompt + max_tokens each).", registry=registry)
        self.kv_limit = Gauge("llm_worker_kv_positions_limit", "KV positions the worker reserves at most "
                              "(MAX_TOKENS_IN_FLIGHT).", registry=registry)
        self.step = Histogram("llm_worker_step_duration_seconds", "Duration of one engine step (prefill and/or "
                              "one decode step of the whole batch).", buckets=STEP_BUCKETS, registry=registry)
        self.recovered = Counter("llm_worker_jobs_recovered", "Jobs this worker took over from a worker that died "
                                 "or drained, resumed after the events already sent.", registry=registry)
        self.queue_wait = Histogram("llm_queue_wait_seconds", "From a job's enqueueing to a worker taking it.",
                                    buckets=LATENCY_BUCKETS, registry=registry)
        self.ttft = Histogram("llm_time_to_first_token_seconds", "From a job's creation to its first token's "
                              "publication.", buckets=TTFT_BUCKETS, registry=registry)
        self.itl = Histogram("llm_inter_token_latency_seconds", "Between two consecutive tokens of a job.",
                             buckets=ITL_BUCKETS, registry=registry)
        self.e2e = Histogram("llm_e2e_request_latency_seconds", "From a job's creation to its last event (done "
                             "or error).", buckets=LATENCY_BUCKETS, registry=registry)
        self.prompt_tokens = Counter("llm_prompt_tokens", "Prompt tokens of the jobs workers started.",
                                     registry=registry)
        self.generation_tokens = Counter("llm_generation_tokens", "Tokens generated and published.",
                                         registry=registry)
        self.finished = Counter("llm_jobs_finished", "Jobs that ended, by reason: a `done` job's finish_reason "
                                "(eos, stop, length; `done` for beam and scoring jobs) or an `error`'s type "
                                "(cancelled, timeout, job_lost...).", ["reason"], registry=registry)

    # -- the engine -------------------------------------------------------------------------------------

    def observe_engine(self, engine: Engine, step_s: float | None = None) -> None:
        """The batch as it stands (after a step, whose duration is `step_s`)."""
        if step_s is not None:
            self.step.observe(step_s)
        running, prefilling = list(engine.running), engine.prefilling
        self.batch_size.set(len(running))
        self.waiting.set(len(engine.waiting) + (prefilling is not None))
        self.kv_used.set(sum(sequence.length for sequence in running) + (prefilling.prefilled if prefilling else 0))
        self.kv_reserved.set(engine.tokens_in_flight())
        self.kv_limit.set(engine.max_tokens_in_flight)

    # -- jobs -------------------------------------------------------------------------------------------

    def admitted(self, job: Job, publisher: MeteredPublisher, sent: list) -> None:
        """A job joins the worker; `sent` are the events a worker that died or drained had published."""
        wait_s = seconds_since(job.enqueued_at)
        if wait_s is not None:
            self.queue_wait.observe(wait_s)
        publisher.resumed = bool(sent)
        if sent:
            self.recovered.inc()
        else:
            self.prompt_tokens.inc(len(job.kwargs.get("payload", {}).get("prompt_ids", ())))

    def published(self, publisher: MeteredPublisher, event: JobEvent) -> None:
        """One event of a job went out."""
        if event.event_type == "token":
            self.generation_tokens.inc()
            now = time.monotonic()
            if publisher.last_token_at is not None:
                self.itl.observe(now - publisher.last_token_at)
            elif not publisher.resumed and (ttft_s := seconds_since(publisher.created_at)) is not None:
                self.ttft.observe(ttft_s)
            publisher.last_token_at = now
        elif event.terminal:
            if (e2e_s := seconds_since(publisher.created_at)) is not None:
                self.e2e.observe(e2e_s)
            self.finished.labels(end_reason(event)).inc()

    # -- the snapshot -----------------------------------------------------------------------------------

    def push(self, connection: redis.Redis, worker: str, pools: list[str], ttl_s: int) -> None:
        """Leave this worker's snapshot in Redis for the API's /metrics (it lapses with the worker)."""
        snapshot = json.dumps({"worker": worker, "pools": ",".join(pools),
                               "metrics": generate_latest(self.registry).decode()})
        with connection.pipeline(transaction=False) as pipe:
            pipe.set(worker_key(worker), snapshot, ex=max(1, ttl_s))
            pipe.sadd(WORKER_SET, worker)
            pipe.execute()


def end_reason(event: JobEvent) -> str:
    """Why a job ended, from its terminal event."""
    if event.event_type == "error":
        return event.error.type
    reason = getattr(event, "finish_reason", None)
    return str(getattr(reason, "value", reason) or "done")


class MeteredEngine(Engine):
    """The batching engine, timing each step and reporting the batch after it."""

    def __init__(self, *args, metrics: WorkerMetrics, **kwargs):
        super().__init__(*args, **kwargs)
        self.metrics = metrics
        metrics.observe_engine(self)

    def step(self):
        started = time.perf_counter()
        updates = super().step()
        self.metrics.observe_engine(self, time.perf_counter() - started)
        return updates


class MeteredPublisher(EventPublisher):
    """A job's publisher that reports each event it sends to the worker's metrics."""

    def __init__(self, connection: redis.Redis, job: Job, ttl_s: int, metrics: WorkerMetrics):
        super().__init__(connection, job.id, ttl_s)
        self.metrics = metrics
        self.created_at = job.created_at
        self.resumed = False
        self.last_token_at: float | None = None

    def append(self, pipe, event: JobEvent):
        stored = super().append(pipe, event)
        self.metrics.published(self, event)
        return stored
