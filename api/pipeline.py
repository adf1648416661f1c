"""The path every generation takes, whatever route it came in by: enqueue it on a pool with a live worker,
then relay its events as they come (SSE) or collect them into one answer."""

from __future__ import annotations

import uuid
from contextlib import closing
from dataclasses import dataclass

from flask import Response

from api.errors import error_from_event
from api.extensions import get_redis, get_settings
from api.job_state import follow_job, request_cancel
from api.routing import choose_backend, submit
from api.sse import Encoder, relay, sse_response
from shared.jobs import GenerationJob, JobKind
from shared.sampling import SamplingParams


@dataclass(frozen=True, slots=True)
class JobOutput:
    """A finished job: its `done` event, and the ids and text of its token events."""

    done: dict
    token_ids: list[int]
    text: str

    @property
    def output_ids(self) -> list[int]:
        """The generated ids (from `done`, or rebuilt from the token events)."""
        return self.done.get("output_ids", self.token_ids)

    @property
    def output_text(self) -> str:
        """The generated text (from `done`, or rebuilt from the token events)."""
        return self.done.get("output_text", self.text)

    def usage(self, prompt_tokens: int) -> dict:
        """`{"prompt_tokens", "completion_tokens"}`, counted here when the worker did not say."""
        usage = self.done.get("usage") or {}
        return {"prompt_tokens": usage.get("prompt_tokens", prompt_tokens),
                "completion_tokens": usage.get("completion_tokens", len(self.output_ids))}


def enqueue(prompt_ids: list[int], sampling: SamplingParams, backend_mode: str, *,
            kind: JobKind = JobKind.GENERATE, extra: dict | None = None) -> GenerationJob:
    """Pick a pool with a live worker for `backend_mode` (503 when none) and enqueue the job there."""
    connection = get_redis()
    backend = choose_backend(connection, backend_mode)
    job = GenerationJob(job_id=uuid.uuid4().hex, prompt_ids=prompt_ids, sampling=sampling, kind=kind,
                        backend=backend, extra=extra or {})
    submit(connection, job, get_settings())
    return job


def collect(job: GenerationJob) -> JobOutput:
    """Wait for the job to end; its output, or the ServiceError its `error` event stands for."""
    token_ids: list[int] = []
    texts: list[str] = []
    with closing(follow_job(get_redis(), job.job_id, get_settings())) as events:
        for event in events:
            if event is None:  # a keep-alive: nothing to send on a plain JSON response
                continue
            if event.type == "token":
                token_ids.append(event.data["token"])
                texts.append(event.data.get("text", ""))
            elif event.type == "error":
                raise error_from_event(event.data)
            elif event.type == "done":
                return JobOutput(event.data, token_ids, "".join(texts))
    raise error_from_event({"error": {"type": "job_lost", "message": "the job's stream ended without a result"}})


def stream(job: GenerationJob, encoder: Encoder | None = None) -> Response:
    """Relay the job's events as SSE (native frames unless `encoder` says otherwise); leaving cancels it."""
    connection, settings = get_redis(), get_settings()
    frames = relay(follow_job(connection, job.job_id, settings), encoder=encoder,
                   on_disconnect=lambda: request_cancel(connection, job.job_id, settings))
    return sse_response(frames, job.job_id)
