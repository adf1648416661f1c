"""`POST /generate` (one JSON answer) and `POST /stream` (SSE): both validate, route, enqueue, then relay."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request

from api import pipeline
from api.extensions import get_settings, get_tokenizer
from api.openapi import Reply, json_reply, operation, sse_media
from api.schemas import GenerationBody, GenerationResult
from api.validation import GenerationRequest, parse_generation_request, read_json_object
from shared.protocol import EVENTS_BY_KIND, DoneEvent, GenerationJob, JobKind

bp = Blueprint("generation", __name__)

GENERATION_ERRORS = {
    400: "A field is missing, of the wrong type or out of range (`field` names it), or the prompt does not fit "
         "the context (`context_length_exceeded`).",
    413: "The body is larger than 1 MiB.",
    503: "No live worker in the pool the request needs (or Redis does not answer).",
}
"""Error answers every generation route may give before the job starts."""

STREAM_EXAMPLE = ('id: 1\nevent: token\ndata: {"token":19556,"text":"Hello","index":0}\n\n'
                  'id: 2\nevent: done\ndata: {"job_id":"0f3c...","output_text":"Hello","output_ids":[19556],'
                  '"finish_reason":"length","usage":{"prompt_tokens":5,"completion_tokens":1}}\n\n')

JOB_EVENTS = EVENTS_BY_KIND[JobKind.GENERATE]
"""The events of a job's stream and the shape of their `data:`."""

STREAM_DESCRIPTION = ("Server-sent events: `token` events with increasing `id:`, then one `done` or `error` event "
                      "(see `x-events` for the JSON of each `data:` line). Comment lines (`: keep-alive`) "
                      "come during silences.")

X_JOB_ID = {"X-Job-Id": "The job's id: for /jobs/<id>, DELETE /jobs/<id> and resuming the stream."}


def start_job() -> tuple[GenerationRequest, GenerationJob]:
    """Validate the request body, pick a pool with a live worker and enqueue the job there."""
    parsed = parse_generation_request(read_json_object(request.get_data()), get_settings(), get_tokenizer)
    return parsed, pipeline.enqueue(parsed.prompt_ids, parsed.sampling, parsed.backend)


@bp.post("/generate")
@operation("Generate text, answered in one piece", tag="generation", body=GenerationBody,
           responses={200: json_reply("The whole output.", GenerationResult)},
           errors={**GENERATION_ERRORS, 409: "The job was cancelled (DELETE /jobs/<id>).",
                   502: "The job was lost (its worker died).", 504: "The job ran past JOB_TIMEOUT_S."})
def generate():
    """Run a job to the end and answer with the whole output (built from the same events /stream relays)."""
    parsed, job = start_job()
    output = pipeline.collect(job)
    return jsonify(generation_result(parsed, job, output))


def generation_result(parsed: GenerationRequest, job: GenerationJob, done: DoneEvent) -> dict:
    """The /generate answer."""
    return result_body(parsed.prompt, job.backend, done)


def result_body(prompt: str, backend: str, done: DoneEvent) -> dict:
    """A `GenerationResult` as JSON (also each slot of a batch's results)."""
    return GenerationResult(job_id=done.job_id, input=prompt, output_ids=done.output_ids,
                            output_text=done.output_text, finish_reason=done.finish_reason, usage=done.usage,
                            backend=backend).model_dump()


@bp.post("/stream")
@operation("Generate text, streamed token by token (SSE)", tag="generation", body=GenerationBody,
           responses={200: Reply("The job's events as they happen.", (
               sse_media(JOB_EVENTS, STREAM_DESCRIPTION, STREAM_EXAMPLE),), X_JOB_ID)},
           errors=GENERATION_ERRORS)
def stream() -> Response:
    """Run a job and relay its events as SSE; a client that leaves early cancels the job."""
    _, job = start_job()
    return pipeline.stream(job)
