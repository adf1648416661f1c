"""`POST /generate_batch` (many prompts, one job each, enqueued together) and `GET /batches/<id>`.

Every prompt becomes its own GENERATE job, so the prompts spread over the pool's workers and batch with
other traffic there; the batch itself is only a record of the jobs (`api.jobs.batch_store`).
"""

from __future__ import annotations

import uuid

from flask import Blueprint, jsonify, url_for

from api.extensions import get_hub, get_redis, get_settings, get_tokenizer
from api.jobs.batch_store import create_batch, current_results, load_batch, progress, wait_for_all
from api.jobs.routing import choose_backend
from api.models.batches import BatchAccepted, BatchBody, BatchStatus
from api.models.parsing import parse_request_body
from api.openapi import json_reply, operation
from api.prompts import encode_prompts
from api.routes.documentation import GENERATION_ERRORS
from shared.exceptions import ValidationError
from shared.protocol import GenerationJob
from shared.settings import Settings

bp = Blueprint("batches", __name__)


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
    sampling = body.sampling(settings.default_max_tokens)
    prompt_ids = encode_prompts(body.prompts, sampling.max_tokens, get_tokenizer(), settings)
    connection = get_redis()
    backend = choose_backend(connection, body.backend or settings.backend_mode)
    jobs = [GenerationJob(job_id=uuid.uuid4().hex, prompt_ids=ids, sampling=sampling, backend=backend,
                          queue_deadline_s=body.queue_deadline_s) for ids in prompt_ids]
    record = create_batch(connection, jobs, body.prompts, settings)
    if not body.wait:
        accepted = BatchAccepted(batch_id=record.batch_id, status="running", total=len(jobs))
        return jsonify(accepted.model_dump()), 202, {"Location": url_for("batches.batch", batch_id=record.batch_id)}
    return jsonify(batch_id=record.batch_id, **progress(wait_for_all(get_hub(), record, settings)))


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
