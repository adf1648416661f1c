"""`POST /generate` (one JSON answer) and `POST /stream` (SSE): both validate, route, enqueue, then relay."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request

from api.extensions import get_settings, get_tokenizer
from api.jobs import pipeline
from api.models.generation import GenerationBody, GenerationResult
from api.models.parsing import read_json_object
from api.openapi import Reply, json_reply, operation, sse_media
from api.prompts import GenerationRequest, parse_generation_request
from api.routes.documentation import (
    BLOCKING_ERRORS,
    GENERATION_ERRORS,
    STREAM_DESCRIPTION,
    STREAM_EXAMPLE,
    X_JOB_ID,
)
from shared.protocol import EVENTS_BY_KIND, GenerationJob, JobKind

bp = Blueprint("generation", __name__)


def start_job() -> tuple[GenerationRequest, GenerationJob]:
    """Validate the request body, pick a pool with a live worker and enqueue the job there."""
    parsed = parse_generation_request(read_json_object(request.get_data()), get_settings(), get_tokenizer)
    return parsed, pipeline.enqueue(parsed.prompt_ids, parsed.sampling, parsed.body)


@bp.post("/generate")
@operation("Generate text, answered in one piece", tag="generation", body=GenerationBody,
           responses={200: json_reply("The whole output.", GenerationResult)},
           errors=BLOCKING_ERRORS)
def generate():
    """Run a job to the end and answer with the whole output (built from the same events /stream relays)."""
    parsed, job = start_job()
    output = pipeline.collect(job)
    return jsonify(GenerationResult.of(parsed.prompt, job.backend, output).model_dump())


@bp.post("/stream")
@operation("Generate text, streamed token by token (SSE)", tag="generation", body=GenerationBody,
           responses={200: Reply("The job's events as they happen.", (
               sse_media(EVENTS_BY_KIND[JobKind.GENERATE], STREAM_DESCRIPTION, STREAM_EXAMPLE),), X_JOB_ID)},
           errors=GENERATION_ERRORS)
def stream() -> Response:
    """Run a job and relay its events as SSE; a client that leaves early cancels the job."""
    _, job = start_job()
    return pipeline.stream(job)
