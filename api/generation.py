"""`POST /generate` (one JSON answer) and `POST /stream` (SSE): both validate, route, enqueue, then relay."""

from __future__ import annotations

import uuid
from contextlib import closing

from flask import Blueprint, Response, jsonify, request

from api.errors import error_from_event
from api.extensions import get_redis, get_settings, get_tokenizer
from api.job_state import follow_job, request_cancel
from api.routing import choose_backend, submit
from api.sse import relay, sse_response
from api.validation import GenerationRequest, parse_generation_request, read_json_object
from shared.jobs import GenerationJob

bp = Blueprint("generation", __name__)


def start_job() -> tuple[GenerationRequest, GenerationJob]:
    """Validate the request body, pick a pool with a live worker and enqueue the job there."""
    settings, connection = get_settings(), get_redis()
    parsed = parse_generation_request(read_json_object(request.get_data()), settings, get_tokenizer)
    backend = choose_backend(connection, parsed.backend)
    job = GenerationJob(job_id=uuid.uuid4().hex, prompt_ids=parsed.prompt_ids, sampling=parsed.sampling,
                        backend=backend)
    submit(connection, job, settings)
    return parsed, job


@bp.post("/generate")
def generate():
    """Run a job to the end and answer with the whole output (built from the same events /stream relays)."""
    parsed, job = start_job()
    tokens: list[int] = []
    texts: list[str] = []
    with closing(follow_job(get_redis(), job.job_id, get_settings())) as events:
        for event in events:
            if event is None:  # a keep-alive: nothing to send on a plain JSON response
                continue
            if event.type == "token":
                tokens.append(event.data["token"])
                texts.append(event.data.get("text", ""))
            elif event.type == "error":
                raise error_from_event(event.data)
            elif event.type == "done":
                return jsonify(generation_result(parsed, job, event.data, tokens, "".join(texts)))
    raise error_from_event({"error": {"type": "job_lost", "message": "the job's stream ended without a result"}})


def generation_result(parsed: GenerationRequest, job: GenerationJob, done: dict, tokens: list[int],
                      text: str) -> dict:
    """The /generate answer; fields missing from the `done` event are rebuilt from the token events."""
    output_ids = done.get("output_ids", tokens)
    usage = done.get("usage") or {}
    return {
        "job_id": job.job_id,
        "input": parsed.prompt,
        "output_ids": output_ids,
        "output_text": done.get("output_text", text),
        "finish_reason": done.get("finish_reason"),
        "usage": {"prompt_tokens": usage.get("prompt_tokens", len(parsed.prompt_ids)),
                  "completion_tokens": usage.get("completion_tokens", len(output_ids))},
        "backend": job.backend,
    }


@bp.post("/stream")
def stream() -> Response:
    """Run a job and relay its events as SSE; a client that leaves early cancels the job."""
    _, job = start_job()
    connection, settings = get_redis(), get_settings()
    frames = relay(follow_job(connection, job.job_id, settings),
                   on_disconnect=lambda: request_cancel(connection, job.job_id, settings))
    return sse_response(frames, job.job_id)
