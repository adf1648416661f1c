"""What several routes' OpenAPI entries share: error descriptions, the SSE stream's description and example,
and the headers they set."""

from __future__ import annotations

from api.errors import JOB_ERRORS

GENERATION_ERRORS = {
    400: "A field is missing, of the wrong type or out of range (`field` names it), or the prompt does not fit "
         "the context (`context_length_exceeded`).",
    413: "The body is larger than 1 MiB.",
    429: "The pool is busy: the request's lane is at its admission bound (type `overloaded`). Nothing was queued; "
         "the `Retry-After` header says in how many seconds to try again (`Retry-After-Ms`: in milliseconds, "
         "scattered, so that clients refused together do not come back together).",
    503: "No live worker in the pool the request needs (or Redis does not answer).",
}
"""Error answers every generation route may give before the job starts."""

def merge_errors(*tables: dict[int, str] | list[tuple[int, str]]) -> dict[int, str]:
    """Status -> description tables as one, the descriptions of a status met twice joined."""
    merged: dict[int, str] = {}
    for table in tables:
        for status, description in (table.items() if isinstance(table, dict) else table):
            merged[status] = f"{merged[status]} Or: {description}" if status in merged else description
    return dict(sorted(merged.items()))


JOB_ERROR_DESCRIPTIONS = merge_errors(list(JOB_ERRORS.values()))
"""Error answers of a route that waits for its job to end (the job's `error` event, as an HTTP status)."""

BLOCKING_ERRORS = merge_errors(GENERATION_ERRORS, JOB_ERROR_DESCRIPTIONS)
"""Every error answer of a route that answers once its job has ended: before the job starts, and the job's own."""

STREAM_EXAMPLE = ('id: 1\nevent: token\ndata: {"token":19556,"text":"Hello","index":0}\n\n'
                  'id: 2\nevent: done\ndata: {"job_id":"0f3c...","output_text":"Hello","output_ids":[19556],'
                  '"finish_reason":"length","usage":{"prompt_tokens":5,"completion_tokens":1}}\n\n')

STREAM_DESCRIPTION = ("Server-sent events: `token` events with increasing `id:`, then one `done` or `error` event "
                      "(see `x-events` for the JSON of each `data:` line). Comment lines (`: keep-alive`) "
                      "come during silences.")

X_JOB_ID = {"X-Job-Id": "The job's id: for /jobs/<id>, DELETE /jobs/<id> and resuming the stream."}
