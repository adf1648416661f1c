"""What the API records with each job it enqueues: the API key that owns it, and the request it came from.

With API keys on, `llm:owner:job:<id>` (and `llm:owner:batch:<id>`) holds the SHA-256 of the key that
created it, written before the job is enqueued (in the same MULTI for a batch). Every request naming a
job or batch (its status, its stream, its cancellation, a batch's results) is checked against it, and any
other key gets the 404 an unknown id gets: ids are not secrets, so another key must not learn even that
the job exists. The request's id travels in the RQ job's `meta`, so the worker's log lines about the job
carry it too.
"""

from __future__ import annotations

import logging

import redis
from flask import Flask, request
from redis.client import Pipeline

from api.auth import current_key
from api.extensions import get_redis
from shared import logs
from shared.exceptions import NotFoundError
from shared.protocol import GenerationJob
from shared.settings import Settings

log = logging.getLogger(__name__)

OWNER_PREFIX = "llm:owner:"

NOT_FOUND = {
    "job_id": lambda job_id: NotFoundError(f"no job with id {job_id!r}", field="job_id"),
    "batch_id": lambda batch_id: NotFoundError(
        f"no batch with id {batch_id!r} (unknown, or older than BATCH_TTL_S)", field="batch_id"),
}
"""The 404 of each kind of id a route may name: the same whether the id is unknown or another key's."""


def owner_key(kind: str, ident: str) -> str:
    """`llm:owner:job:<id>` or `llm:owner:batch:<id>`: the SHA-256 of the key that created it."""
    return f"{OWNER_PREFIX}{kind}:{ident}"


def owner_ttl_s(settings: Settings) -> int:
    """How long an owner record lives: as long as anything of its job or batch stays readable."""
    return settings.job_timeout_s + max(settings.backlog_ttl_s, settings.batch_ttl_s)


def claim(client: redis.Redis | Pipeline, kind: str, ids: list[str], settings: Settings) -> None:
    """Record the current request's key as the owner of `ids` (nothing when keys are off)."""
    key = current_key()
    if key is None:
        return
    for ident in ids:
        client.set(owner_key(kind, ident), key.owner, ex=owner_ttl_s(settings))


def start(jobs: list[GenerationJob]) -> dict:
    """Before enqueueing `jobs`: bind the job id to the request's log lines. Returns the `meta` to enqueue them
    with (the request id, for the worker's log lines). Their owner is claimed in the enqueue's transaction."""
    if len(jobs) == 1:
        logs.bind(job_id=jobs[0].job_id)
    request_id = logs.REQUEST_ID.get()
    return {"request_id": request_id} if request_id else {}


def enqueued(jobs: list[GenerationJob]) -> None:
    """Log the jobs' admission (a refused request logs its 429 in the access line instead)."""
    if len(jobs) == 1:
        job = jobs[0]
        log.info("enqueued a %s job on %s (%d prompt tokens)", job.kind.value, job.backend, len(job.prompt_ids))
    else:
        log.info("enqueued %d jobs on %s", len(jobs), jobs[0].backend, extra={"job_ids": [j.job_id for j in jobs]})


def init_app(app: Flask) -> None:
    """Check the owner of the job or batch a request names, before its view runs."""
    app.before_request(check_owner)


def check_owner() -> None:
    """404 (as for an unknown id) when keys are on and the job or batch named belongs to another key."""
    key = current_key()
    if key is None or not request.view_args:
        return
    for name, kind in (("job_id", "job"), ("batch_id", "batch")):
        ident = request.view_args.get(name)
        if ident is None:
            continue
        owner = get_redis().get(owner_key(kind, ident))
        if owner is None or owner.decode() != key.owner:
            raise NOT_FOUND[name](ident)
