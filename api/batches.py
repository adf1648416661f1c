"""`POST /generate_batch` (many prompts, one job each, enqueued together) and `GET /batches/<id>`.

Every prompt becomes its own GENERATE job, so the prompts spread over the pool's workers and batch with
other traffic there; the batch itself is only a record of the jobs (`api.batch_store`).
"""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from flask import Blueprint, jsonify, url_for
from pydantic import BaseModel, ConfigDict, Field

from api.batch_store import create_batch, current_results, load_batch, progress, wait_for_all
from api.extensions import get_redis, get_settings, get_tokenizer
from api.generation import GENERATION_ERRORS
from api.openapi import json_reply, operation
from api.routing import choose_backend
from api.schemas import BACKEND_FIELD, Backend, ErrorBody, GenerationResult
from api.validation import check_context, parse_request_body
from shared.exceptions import ContextLengthError, ValidationError
from shared.protocol import GenerationJob
from shared.sampling import STRICT, SamplingFields, SamplingParams
from shared.settings import Settings
from shared.tokenizer import TextTokenizer

bp = Blueprint("batches", __name__)


class BatchBody(SamplingFields):
    """`POST /generate_batch`: prompts that share the sampling fields."""

    model_config = ConfigDict(**STRICT, json_schema_extra={"examples": [{
        "prompts": ["The capital of France is", "The largest planet is"], "max_tokens": 16, "temperature": 0}]})

    prompts: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1, description=(
        "Raw texts, tokenized as /generate tokenizes a prompt; at most MAX_BATCH_PROMPTS (64 by default). Each "
        "must fit the context with max_tokens, or the whole request is a 400 naming it (`prompts[i]`)."))
    backend: Backend | None = BACKEND_FIELD
    wait: bool = Field(True, description="Answer once every prompt is done (200), or at once (202) with the "
                                         "batch's id to poll at GET /batches/<id>.")


class BatchProgress(BaseModel):
    """How many of the batch's prompts have ended (successfully or not)."""

    done: int
    total: int


class BatchAccepted(BaseModel):
    """`POST /generate_batch` answer with `wait: false`."""

    batch_id: str
    status: Literal["running"]
    total: int


class BatchStatus(BaseModel):
    """A batch's results in the prompts' order: what /generate answers, an error, or null while running."""

    batch_id: str
    status: Literal["running", "done"]
    progress: BatchProgress
    results: list[GenerationResult | ErrorBody | None] = Field(description=(
        "One slot per prompt: its /generate answer, `{\"error\": {...}}` when its job failed (the others "
        "still complete), or null while it is queued or running."))


@bp.post("/generate_batch")
@operation("Generate text for many prompts", tag="batches", body=BatchBody,
           responses={200: json_reply("`wait: true`: every prompt's result.", BatchStatus),
                      202: json_reply("`wait: false`: the batch was enqueued; poll Location.", BatchAccepted,
                                      headers={"Location": "/batches/<id>, the batch's status."})},
           errors=GENERATION_ERRORS)
def generate_batch():
    """Enqueue one job per prompt, all in one round trip, then wait for them all or answer at once.

    The jobs are ordinary generation jobs: they spread over the pool's workers and batch with other
    traffic. The batch and its results stay readable at GET /batches/<id> for BATCH_TTL_S.
    """
    settings = get_settings()
    body = parse_request_body(BatchBody, settings)
    check_batch_size(len(body.prompts), settings)
    sampling = SamplingParams.from_fields(body, default_max_tokens=settings.default_max_tokens)
    prompt_ids = encode_prompts(body.prompts, sampling.max_tokens, get_tokenizer(), settings)
    connection = get_redis()
    backend = choose_backend(connection, body.backend or settings.backend_mode)
    jobs = [GenerationJob(job_id=uuid.uuid4().hex, prompt_ids=ids, sampling=sampling, backend=backend)
            for ids in prompt_ids]
    record = create_batch(connection, jobs, body.prompts, settings)
    if not body.wait:
        accepted = BatchAccepted(batch_id=record.batch_id, status="running", total=len(jobs))
        return jsonify(accepted.model_dump()), 202, {"Location": url_for("batches.batch", batch_id=record.batch_id)}
    return jsonify(batch_id=record.batch_id, **progress(wait_for_all(connection, record, settings)))


@bp.get("/batches/<batch_id>")
@operation("A batch's progress and its results so far", tag="batches",
           responses={200: json_reply("The batch's status.", BatchStatus)},
           errors={404: "No batch with this id (never created, or older than BATCH_TTL_S)."})
def batch(batch_id: str):
    """Each prompt's result so far, from its job's events; `status` is `done` once every prompt has ended."""
    connection = get_redis()
    record = load_batch(connection, batch_id)
    return jsonify(batch_id=batch_id, **progress(current_results(connection, record)))


def check_batch_size(count: int, settings: Settings) -> None:
    """Refuse more prompts than MAX_BATCH_PROMPTS (a setting, so not in the schema)."""
    if count > settings.max_batch_prompts:
        raise ValidationError(f"'prompts' has {count} prompts; at most {settings.max_batch_prompts} are allowed "
                              "in one batch", field="prompts")


def encode_prompts(prompts: list[str], max_tokens: int, tokenizer: TextTokenizer,
                   settings: Settings) -> list[list[int]]:
    """Token ids of every prompt; a 400 naming `prompts[i]` for the first one that does not fit the context."""
    context = min(tokenizer.context_length, settings.max_seq_len)
    encoded = []
    for index, prompt in enumerate(prompts):
        ids = tokenizer.encode(prompt)
        if not ids:
            raise ValidationError(f"'prompts[{index}]' encodes to no tokens", field="prompts")
        try:
            check_context(len(ids), max_tokens, context, field="prompts")
        except ContextLengthError as exc:
            raise ContextLengthError(f"'prompts[{index}]': {exc.message}", field="prompts") from None
        encoded.append(ids)
    return encoded
