"""`GET /health`: whether Redis answers, and how many workers each pool has ready and starting."""

from __future__ import annotations

from flask import Blueprint, jsonify

from api.errors import REDIS_DOWN
from api.extensions import get_redis
from api.jobs.routing import worker_counts
from api.models.jobs import Health
from api.openapi import json_reply, operation
from shared.settings import BACKENDS

bp = Blueprint("health", __name__)


@bp.get("/health")
@operation("Whether Redis answers, and ready and starting workers per pool", tag="service", responses={
    200: json_reply("Redis answers.", Health), 503: json_reply("Redis does not answer.", Health)})
def health():
    """200 with worker counts when Redis answers (status `starting` while workers load and none is ready yet),
    503 (same shape, `redis: false`) when it does not."""
    connection = get_redis()
    try:
        connection.ping()
        counts = worker_counts(connection)
    except REDIS_DOWN:
        none = dict.fromkeys(BACKENDS, 0)
        return jsonify(status="unavailable", redis=False, workers=none, starting=none), 503
    ready = {pool: count["ready"] for pool, count in counts.items()}
    starting = {pool: count["starting"] for pool, count in counts.items()}
    status = "starting" if not any(ready.values()) and any(starting.values()) else "ok"
    return jsonify(status=status, redis=True, workers=ready, starting=starting)
