"""The path every generation takes, whatever route it came in by: enqueue it on a pool with a live worker,
then relay its events as they come (SSE) or collect them into one answer."""

from __future__ import annotations

import uuid
from contextlib import closing

from flask import Response

from api.errors import error_from_event
from api.extensions import get_redis, get_settings
from api.jobs.routing import choose_backend, submit
from api.jobs.sse import Encoder, relay, sse_response
from api.jobs.state import follow_job, request_cancel
from shared.protocol import EVENTS_BY_KIND, BeamOptions, DoneEvent, ErrorBody, GenerationJob, JobKind, ScoreOptions
from shared.sampling import SamplingParams


def enqueue(prompt_ids: list[int], sampling: SamplingParams, backend_mode: str, *,
            kind: JobKind = JobKind.GENERATE, beam: BeamOptions | None = None,
            score: ScoreOptions | None = None) -> GenerationJob:
    """Pick a pool with a live worker for `backend_mode` (503 when none) and enqueue the job there."""
    connection = get_redis()
    backend = choose_backend(connection, backend_mode)
    job = GenerationJob(job_id=uuid.uuid4().hex, prompt_ids=prompt_ids, sampling=sampling, kind=kind,
                        backend=backend, beam=beam, score=score)
    submit(connection, job, get_settings())
    return job


def collect(job: GenerationJob) -> DoneEvent:
    """Wait for the job to end; its `done` event (of the job kind's type), or the ServiceError of its `error`."""
    done_type = EVENTS_BY_KIND[job.kind]["done"]
    with closing(follow_job(get_redis(), job.job_id, get_settings())) as events:
        for event in events:
            if event is None or not event.terminal:  # keep-alives and tokens: the `done` event has everything
                continue
            if event.type == "error":
                raise error_from_event(ErrorBody.model_validate(event.data))
            return done_type.model_validate(event.data)
    raise error_from_event(ErrorBody.of("job_lost", "the job's stream ended without a result"))


def stream(job: GenerationJob, encoder: Encoder | None = None) -> Response:
    """Relay the job's events as SSE (native frames unless `encoder` says otherwise); leaving cancels it."""
    connection, settings = get_redis(), get_settings()
    frames = relay(follow_job(connection, job.job_id, settings), encoder=encoder,
                   on_disconnect=lambda: request_cancel(connection, job.job_id, settings))
    return sse_response(frames, job.job_id)
