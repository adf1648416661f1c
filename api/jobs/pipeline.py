"""The path every generation takes, whatever route it came in by: enqueue it on a pool with a live worker,
then relay its events as they come (SSE) or collect them into one answer."""

from __future__ import annotations

import select
import socket
import time
import uuid
from contextlib import closing
from typing import Protocol

from flask import Response, request

from api.errors import error_from_event
from api.extensions import get_hub, get_redis, get_settings
from api.jobs.routing import choose_backend, submit
from api.jobs.sse import Encoder, relay, sse_response
from api.jobs.state import follow_job, request_cancel
from shared.exceptions import ServiceError
from shared.lanes import lane_for
from shared.protocol import EVENTS_BY_KIND, BeamOptions, DoneEvent, ErrorBody, GenerationJob, JobKind, ScoreOptions
from shared.sampling import SamplingParams

CLIENT_CHECK_S = 0.5
"""How often a blocking answer looks whether its client is still connected."""


class ClientGone(ServiceError):
    """The client of a blocking request hung up; its job was cancelled and nobody reads the answer (the 499
    some proxies log for a client that closed its request)."""

    status = 499
    error_type = "client_closed_request"


class Placement(Protocol):
    """The fields of a request body that say where its job runs and how long it may wait to start."""

    backend: str | None
    queue_deadline_s: float | None


def enqueue(prompt_ids: list[int], sampling: SamplingParams, placement: Placement, *,
            kind: JobKind = JobKind.GENERATE, beam: BeamOptions | None = None,
            score: ScoreOptions | None = None) -> GenerationJob:
    """Pick a pool with a live worker for the body's `backend` (503 when none) and enqueue the job on its lane
    there (429 when the lane is at its admission bound)."""
    connection, settings = get_redis(), get_settings()
    backend = choose_backend(connection, placement.backend or settings.backend_mode)
    job = GenerationJob(job_id=uuid.uuid4().hex, prompt_ids=prompt_ids, sampling=sampling, kind=kind,
                        backend=backend, beam=beam, score=score,
                        queue_deadline_s=placement.queue_deadline_s or settings.queue_deadline_s or None)
    submit(connection, [job], lane_for(job), settings)
    return job


def collect(job: GenerationJob) -> DoneEvent:
    """Wait for the job to end; its `done` event (of the job kind's type), or the ServiceError of its `error`.

    A client that hangs up meanwhile has its job cancelled, as leaving a stream does (checked every
    CLIENT_CHECK_S while events or keep-alives come).
    """
    done_type = EVENTS_BY_KIND[job.kind]["done"]
    connection, settings = get_redis(), get_settings()
    checked_at = time.monotonic()
    with closing(follow_job(get_hub(), job.job_id, settings)) as events:
        for event in events:
            if time.monotonic() - checked_at >= CLIENT_CHECK_S:
                checked_at = time.monotonic()
                if client_gone():
                    request_cancel(connection, job.job_id, settings)
                    raise ClientGone(f"the client left before job {job.job_id} ended; it was cancelled")
            if event is None or not event.terminal:  # keep-alives and tokens: the `done` event has everything
                continue
            if event.type == "error":
                raise error_from_event(ErrorBody.model_validate(event.data))
            return done_type.model_validate(event.data)
    raise error_from_event(ErrorBody.of("job_lost", "the job's stream ended without a result"))


def client_gone() -> bool:
    """Whether the client of the current request has closed its connection (known under gunicorn only).

    A blocking answer writes nothing until the end, so the server would not notice a departure otherwise:
    peek at the socket; readable with no data is the peer's FIN.
    """
    sock = request.environ.get("gunicorn.socket")
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:  # reset by the peer
        return True


def stream(job: GenerationJob, encoder: Encoder | None = None) -> Response:
    """Relay the job's events as SSE (native frames unless `encoder` says otherwise); leaving cancels it."""
    connection, settings = get_redis(), get_settings()
    frames = relay(follow_job(get_hub(), job.job_id, settings, resumable=True), encoder=encoder,
                   on_disconnect=lambda: request_cancel(connection, job.job_id, settings))
    return sse_response(frames, job.job_id)
