"""Stand-ins for the worker side in API tests: a thread that takes a job from a pool's queue and
publishes a scripted event stream through `shared.events`, plus a reader for SSE response bodies."""

from __future__ import annotations

import json
import threading
import uuid

import redis
from rq import Queue
from rq.job import JobStatus
from rq.serializers import JSONSerializer

from api.routing import submit
from shared.events import EventPublisher
from shared.jobs import GenerationJob
from shared.sampling import SamplingParams
from shared.settings import Settings

SCRIPT = [(19556, "Hello"), (28, ","), (905, " world"), (17, "!")]
"""(token id, text) pairs a scripted worker emits, at most `max_tokens` of them."""

WAIT_S = 10
"""How long a scripted worker waits for its job before giving up (only reached when a test is broken)."""


def publish_generation(connection: redis.Redis, job_id: str, prompt_ids: list[int], max_tokens: int = 32,
                       script: list[tuple[int, str]] = SCRIPT, finish_reason: str | None = None) -> None:
    """Publish what a worker publishes for a finished job: one `token` event per token, then `done`.

    `finish_reason` defaults to what the script implies (`length` when cut by max_tokens, else `eos`)."""
    publisher = EventPublisher(connection, job_id, ttl_s=60)
    tokens = script[:max_tokens]
    for index, (token, text) in enumerate(tokens):
        publisher.publish("token", {"token": token, "text": text, "index": index})
    publisher.publish("done", {
        "job_id": job_id, "output_text": "".join(text for _, text in tokens),
        "output_ids": [token for token, _ in tokens],
        "finish_reason": finish_reason or ("length" if max_tokens <= len(script) else "eos"),
        "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": len(tokens)},
    })


class ScriptedWorker(threading.Thread):
    """Takes the next job from `pool`'s RQ queue and runs it by publishing `SCRIPT` (or an error event)."""

    def __init__(self, connection: redis.Redis, pool: str = "cpu", error: dict | None = None,
                 finish_reason: str | None = None):
        super().__init__(daemon=True)
        self.connection = connection
        self.pool = pool
        self.error = error
        self.finish_reason = finish_reason
        self.payload: dict | None = None
        self.failure: BaseException | None = None

    def run(self) -> None:
        """Take one job and publish its events; any failure is kept for `finish()` to raise."""
        try:
            queue = Queue(self.pool, connection=self.connection, serializer=JSONSerializer)
            found = Queue.dequeue_any([queue], timeout=WAIT_S, connection=self.connection, serializer=JSONSerializer)
            if found is None:
                raise TimeoutError(f"no job arrived on the {self.pool!r} queue")
            job, _ = found
            job.set_status(JobStatus.STARTED)
            self.payload = job.kwargs["payload"]
            if self.error is not None:
                EventPublisher(self.connection, job.id, ttl_s=60).publish("error", {"error": self.error})
                job.set_status(JobStatus.FAILED)
                return
            publish_generation(self.connection, job.id, self.payload["prompt_ids"],
                               self.payload["sampling"]["max_tokens"], finish_reason=self.finish_reason)
            job.set_status(JobStatus.FINISHED)
        except BaseException as exc:  # noqa: BLE001 - handed to the test by finish()
            self.failure = exc

    def finish(self) -> dict:
        """Wait for the thread; the payload of the job it ran (re-raising whatever went wrong)."""
        self.join(timeout=WAIT_S + 5)
        assert not self.is_alive(), "scripted worker still running"
        if self.failure is not None:
            raise self.failure
        return self.payload


def enqueue_job(connection: redis.Redis, pool: str = "cpu", prompt_ids: list[int] | None = None) -> str:
    """Enqueue a job the way the API does, without HTTP; its id."""
    job = GenerationJob(job_id=uuid.uuid4().hex, prompt_ids=prompt_ids or [1, 2, 3],
                        sampling=SamplingParams(), backend=pool)
    submit(connection, job, Settings())
    return job.job_id


def parse_sse(body: str) -> tuple[list[dict], list[str]]:
    """Events (`{"id", "event", "data"}`) and comment lines of an SSE body."""
    events, comments = [], []
    for block in body.split("\n\n"):
        if not block:
            continue
        fields: dict = {}
        for line in block.split("\n"):
            if line.startswith(":"):
                comments.append(line)
                continue
            name, _, value = line.partition(": ")
            fields[name] = value
        if "event" in fields:
            event_id = int(fields["id"]) if "id" in fields else None
            events.append({"id": event_id, "event": fields["event"], "data": json.loads(fields["data"])})
    return events, comments
