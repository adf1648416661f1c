"""`/jobs/<id>`: a job's status, resuming its event stream, cancelling it."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request

from api.extensions import get_redis, get_settings
from api.job_state import describe, follow_job, last_event, request_cancel, require_known
from api.sse import relay, sse_response
from shared.exceptions import ValidationError

bp = Blueprint("jobs", __name__, url_prefix="/jobs")


@bp.get("/<job_id>")
def status(job_id: str):
    """RQ's status of the job, and its result (or error) once it has ended."""
    return jsonify(describe(get_redis(), job_id))


@bp.get("/<job_id>/stream")
def resume(job_id: str) -> Response:
    """Replay the events after `Last-Event-ID` (header, or `?last_event_id=`), then follow live.

    A resumed reader is an observer: leaving does not cancel the job (DELETE does). A client that has
    seen the job's last event already gets 204 No Content.
    """
    after_id = last_event_id()
    connection = get_redis()
    require_known(connection, job_id)
    last = last_event(connection, job_id)
    if last is not None and last.terminal and after_id >= last.id:
        # The client saw the end already; 204 is what tells an EventSource to stop reconnecting.
        return Response(status=204, headers={"X-Job-Id": job_id})
    return sse_response(relay(follow_job(connection, job_id, get_settings(), after_id)), job_id)


@bp.delete("/<job_id>")
def cancel(job_id: str):
    """Cancel a job: 200 `cancelled` while still queued, 202 `cancelling` once a worker has it."""
    connection = get_redis()
    require_known(connection, job_id)
    last = last_event(connection, job_id)
    if last is not None and last.terminal:
        ended = "finished" if last.type == "done" else "failed"
        return jsonify(job_id=job_id, status=ended), 200
    outcome = request_cancel(connection, job_id, get_settings())
    return jsonify(job_id=job_id, status=outcome), 200 if outcome == "cancelled" else 202


def last_event_id() -> int:
    """The id of the last event the client saw (0: none), from the header or the query string."""
    raw = request.headers.get("Last-Event-ID") or request.args.get("last_event_id") or "0"
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValidationError(f"Last-Event-ID must be a non-negative integer, got {raw!r}", field="Last-Event-ID")
    return value
