"""Stand-ins for the worker side in API tests: a thread that takes a job from a pool's queue and
publishes a scripted event stream through `shared.events` (SSE bodies are read by tests/sse_client.py)."""

from __future__ import annotations

import math
import threading
import uuid

import redis
from rq import Queue, Worker
from rq.job import JobStatus
from rq.serializers import JSONSerializer

from api.jobs.routing import submit
from shared.events import EventPublisher
from shared.lanes import LANES, Lane, pool_workers, queue_name
from shared.protocol import (
    BeamCandidate,
    BeamDoneEvent,
    CandidatesEvent,
    DoneEvent,
    ErrorBody,
    GenerationJob,
    ScoredCandidate,
    ScoreDoneEvent,
    TokenEvent,
    Usage,
)
from shared.sampling import SamplingParams
from shared.settings import Settings
from tests.tiny_tokenizer import single_tokens

SCRIPT = single_tokens("Hello", ",", " world", "!")
"""(token id, text) pairs a scripted worker emits, at most `max_tokens` of them (ids of the tiny tokenizer,
which the API tests' app uses)."""

WAIT_S = 10
"""How long a scripted worker waits for its job before giving up (only reached when a test is broken)."""


def publish_generation(connection: redis.Redis, job_id: str, prompt_ids: list[int], max_tokens: int = 32,
                       script: list[tuple[int, str]] = SCRIPT, finish_reason: str | None = None) -> None:
    """Publish what a worker publishes for a finished job: one `token` event per token, then `done`.

    `finish_reason` defaults to what the script implies (`length` when cut by max_tokens, else `eos`)."""
    publisher = EventPublisher(connection, job_id, ttl_s=60)
    tokens = script[:max_tokens]
    for index, (token, text) in enumerate(tokens):
        publisher.publish(TokenEvent(token=token, text=text, index=index))
    publisher.publish(DoneEvent(
        job_id=job_id, output_text="".join(text for _, text in tokens), output_ids=[token for token, _ in tokens],
        finish_reason=finish_reason or ("length" if max_tokens <= len(script) else "eos"),
        usage=Usage(prompt_tokens=len(prompt_ids), completion_tokens=len(tokens))))


def publish_beam(connection: redis.Redis, job_id: str, payload: dict) -> None:
    """What a worker publishes for a BEAM job: `candidates` (one per beam), the winner's tokens, `done`.

    Beam i is the script shortened by i tokens; with rerank, relevance grows with i so that a later beam wins."""
    extra, publisher = payload["beam"], EventPublisher(connection, job_id, ttl_s=60)
    beams = [SCRIPT[: max(1, len(SCRIPT) - i)] for i in range(extra["beam_width"])]
    rows = []
    for index, tokens in enumerate(beams):
        beam_score = -0.1 * (index + 1)
        rerank = 0.1 * index if extra["use_rerank"] else None
        combined = beam_score if rerank is None else 0.5 * rerank + 0.5 * math.exp(beam_score)
        rows.append(BeamCandidate(index=index, text="".join(text for _, text in tokens), beam_score=beam_score,
                                  rerank_score=rerank, combined_score=combined))
    winner = max(range(len(rows)), key=lambda i: rows[i].combined_score)
    publisher.publish(CandidatesEvent(candidates=rows, winner=winner, use_rerank=extra["use_rerank"]))
    for index, (token, text) in enumerate(beams[winner]):
        publisher.publish(TokenEvent(token=token, text=text, index=index))
    publisher.publish(BeamDoneEvent(
        job_id=job_id, output_text=rows[winner].text, output_ids=[t for t, _ in beams[winner]],
        finish_reason="length", winner=winner,
        usage=Usage(prompt_tokens=len(payload["prompt_ids"]), completion_tokens=len(beams[winner]))))


def score_rows(candidates: list[str]) -> list[ScoredCandidate]:
    """The scores a scripted worker gives SCORE candidates: the longest text scores best."""
    return [ScoredCandidate(index=i, text=text, lm_score=-1.0 / len(text), rerank_score=len(text) / 100,
                            combined_score=len(text) / 100 - 1.0 / len(text)) for i, text in enumerate(candidates)]


def publish_scores(connection: redis.Redis, job_id: str, payload: dict) -> None:
    """What a worker publishes for a SCORE job: only `done`, with every candidate's scores and the winner."""
    rows = score_rows(payload["score"]["candidates"])
    winner = max(range(len(rows)), key=lambda i: rows[i].combined_score)
    EventPublisher(connection, job_id, ttl_s=60).publish(ScoreDoneEvent(job_id=job_id, candidates=rows,
                                                                        winner=winner))


class ScriptedWorker(threading.Thread):
    """Takes the next `jobs` jobs from `pool`'s RQ queue and runs each by publishing a script or an error event.

    `error` fails every job; `errors` maps the n-th job taken (from 0) to the error it fails with. A BEAM
    or SCORE job gets what a worker publishes for those kinds (`publish_beam`, `publish_scores`)."""

    def __init__(self, connection: redis.Redis, pool: str = "cpu", error: dict | None = None,
                 finish_reason: str | None = None, jobs: int = 1, errors: dict[int, dict] | None = None):
        super().__init__(daemon=True)
        self.connection = connection
        self.pool = pool
        self.error = error
        self.finish_reason = finish_reason
        self.jobs = jobs
        self.errors = errors or {}
        self.payloads: list[dict] = []
        self.failure: BaseException | None = None

    @property
    def payload(self) -> dict | None:
        """The payload of the last job taken."""
        return self.payloads[-1] if self.payloads else None

    def run(self) -> None:
        """Take the jobs one by one and publish their events; any failure is kept for `finish()` to raise."""
        try:
            queues = [Queue(queue_name(self.pool, lane), connection=self.connection, serializer=JSONSerializer)
                      for lane in LANES]  # as a real worker of the pool listens
            for number in range(self.jobs):
                found = Queue.dequeue_any(queues, timeout=WAIT_S, connection=self.connection,
                                          serializer=JSONSerializer)
                if found is None:
                    raise TimeoutError(f"no job arrived on the {self.pool!r} queue")
                self.run_job(found[0], self.errors.get(number, self.error))
        except BaseException as exc:  # noqa: BLE001 - handed to the test by finish()
            self.failure = exc

    def run_job(self, job, error: dict | None) -> None:
        """Publish one job's events (by its kind), or `error`, and settle its RQ status."""
        job.set_status(JobStatus.STARTED)
        payload = job.kwargs["payload"]
        self.payloads.append(payload)
        if error is not None:
            EventPublisher(self.connection, job.id, ttl_s=60).publish(ErrorBody.model_validate({"error": error}))
            job.set_status(JobStatus.FAILED)
            return
        if payload.get("kind") == "beam":
            publish_beam(self.connection, job.id, payload)
        elif payload.get("kind") == "score":
            publish_scores(self.connection, job.id, payload)
        else:
            publish_generation(self.connection, job.id, payload["prompt_ids"], payload["sampling"]["max_tokens"],
                               finish_reason=self.finish_reason)
        job.set_status(JobStatus.FINISHED)

    def finish(self) -> dict:
        """Wait for the thread; the payload of the last job it ran (re-raising whatever went wrong)."""
        self.join(timeout=WAIT_S * self.jobs + 5)
        assert not self.is_alive(), "scripted worker still running"
        if self.failure is not None:
            raise self.failure
        return self.payload


def queued_jobs(connection: redis.Redis, pool: str = "cpu") -> int:
    """Jobs waiting in any lane of `pool`."""
    return sum(Queue(queue_name(pool, lane), connection=connection).count for lane in LANES)


def enqueue_job(connection: redis.Redis, pool: str = "cpu", prompt_ids: list[int] | None = None) -> str:
    """Enqueue a job the way the API does, without HTTP; its id."""
    ensure_live_worker(connection, pool)
    job = GenerationJob(job_id=uuid.uuid4().hex, prompt_ids=prompt_ids or [1, 2, 3],
                        sampling=SamplingParams(), backend=pool)
    submit(connection, [job], Lane.INTERACTIVE, Settings())
    return job.job_id



def ensure_live_worker(connection: redis.Redis, pool: str = "cpu") -> None:
    """The API takes jobs only for a pool with a live worker: register one (it takes no job) if the pool has none."""
    if not pool_workers(connection, pool):
        Worker([Queue(pool, connection=connection)], connection=connection).register_birth()
