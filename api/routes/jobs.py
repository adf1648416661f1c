"""`/jobs/<id>`: a job's status, resuming its event stream, cancelling it."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request

from api.extensions import get_hub, get_redis, get_settings
from api.jobs.sse import relay, sse_response
from api.jobs.state import describe, follow_job, last_event, request_cancel, require_known
from api.models.jobs import CancelResult, JobStatus
from api.openapi import Param, Reply, json_reply, operation, sse_media
from api.routes.documentation import STREAM_EXAMPLE, X_JOB_ID
from shared.exceptions import ValidationError
from shared.protocol import ANY_JOB_EVENTS

RESUME_DESCRIPTION = ("Server-sent events of the job, whatever its kind: a generation's `token` events, a beam "
                      "search's `candidates` then its winner's tokens, then one `done` (a scoring job's carries its "
                      "scores) or `error` event (see `x-events`). Comment lines (`: keep-alive`) come during "
                      "silences.")

bp = Blueprint("jobs", __name__, url_prefix="/jobs")


EVENT_ID = {"type": "string", "pattern": "^[0-9]+$"}
"""An event id as a client sends it back: digits only (`last_event_id()` checks it)."""

NOT_FOUND = {404: "No job with this id (never enqueued, or expired after BACKLOG_TTL_S)."}


@bp.get("/<job_id>")
@operation("A job's status, and its result once done", tag="jobs",
           responses={200: json_reply("RQ's status of the job.", JobStatus)}, errors=NOT_FOUND)
def status(job_id: str):
    """RQ's status of the job, and its result (or error) once it has ended."""
    return jsonify(describe(get_redis(), job_id))


@bp.get("/<job_id>/stream")
@operation("Resume a job's event stream", tag="jobs",
           params=(Param("Last-Event-ID", "header", "Id of the last event seen; the replay starts after it.",
                         EVENT_ID),
                   Param("last_event_id", "query", "The same, for clients that cannot set headers.", EVENT_ID)),
           responses={200: Reply("The events after Last-Event-ID, then the live ones.", (
               sse_media(ANY_JOB_EVENTS, RESUME_DESCRIPTION, STREAM_EXAMPLE),), X_JOB_ID),
               204: Reply("The client has seen the job's last event already.")},
           errors={400: "Last-Event-ID is not a non-negative integer.", **NOT_FOUND})
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
    return sse_response(relay(follow_job(get_hub(), job_id, get_settings(), after_id, resumable=True)), job_id)


@bp.delete("/<job_id>")
@operation("Cancel a job", tag="jobs", responses={
    200: json_reply("`cancelled` (it was still queued), or `finished`/`failed` (it had ended).", CancelResult),
    202: json_reply("`cancelling`: its worker stops it before the next token.", CancelResult)}, errors=NOT_FOUND)
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
    raw = request.headers.get("Last-Event-ID", request.args.get("last_event_id", "0"))
    # Digits only: int() would also take " 7", "+7", "7_0" and other scripts' digits.
    if not (raw.isascii() and raw.isdigit()):
        raise ValidationError(f"Last-Event-ID must be a non-negative integer, got {raw!r}", field="Last-Event-ID")
    return int(raw)
