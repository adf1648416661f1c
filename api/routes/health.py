"""`GET /health`: whether Redis answers and how many live workers each pool has."""

from __future__ import annotations

from flask import Blueprint, jsonify

from api.errors import REDIS_DOWN
from api.extensions import get_redis
from api.jobs.routing import live_worker_counts
from api.models.jobs import Health
from api.openapi import json_reply, operation
from shared.settings import BACKENDS

bp = Blueprint("health", __name__)


@bp.get("/health")
@operation("Whether Redis answers, and live workers per pool", tag="service", responses={
    200: json_reply("Redis answers.", Health), 503: json_reply("Redis does not answer.", Health)})
def health():
    """200 with live worker counts when Redis answers, 503 (same shape, `redis: false`) when it does not."""
    connection = get_redis()
    try:
        connection.ping()
        workers = live_worker_counts(connection)
    except REDIS_DOWN:
        return jsonify(status="unavailable", redis=False, workers=dict.fromkeys(BACKENDS, 0)), 503
    return jsonify(status="ok", redis=True, workers=workers)
