"""Every event type, built by the real worker and relayed by the real API, matches what /openapi.json says.

gunicorn + a real CPU worker + real Redis: each SSE route's events are validated against the schema its
`x-events` names, and together the runs must cover every event name the document lists.
"""

from __future__ import annotations

import pytest
import requests
from jsonschema import Draft202012Validator

from tests.sse_client import iter_events

pytestmark = [pytest.mark.integration, pytest.mark.model]

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def document(service) -> dict:
    return requests.get(service.url("/openapi.json"), timeout=10).json()


def validator(document: dict, schema: dict) -> Draft202012Validator:
    """A validator of `schema`, whose `$ref`s point into the document's components."""
    return Draft202012Validator({**schema, "components": document["components"]})


def x_events(document: dict, path: str, method: str = "post") -> dict:
    return document["paths"][path][method]["responses"]["200"]["content"]["text/event-stream"]["x-events"]


def check_events(document: dict, path: str, events: list, method: str = "post") -> set[str]:
    """Validate each event's data against the route's documented schema; the event names seen."""
    documented = x_events(document, path, method)
    for event in events:
        assert event.event in documented, f"{path} sent an undocumented event {event.event!r}"
        errors = list(validator(document, documented[event.event]).iter_errors(event.data))
        assert not errors, f"{path} {event.event}: {errors[0].message}"
    return {event.event for event in events}


def read_stream(service, path: str, body: dict) -> tuple[list, str]:
    with requests.post(service.url(path), json=body, stream=True, timeout=300) as response:
        assert response.status_code == 200, response.text
        return list(iter_events(response)), response.headers["X-Job-Id"]


def resume(service, job_id: str) -> list:
    with requests.get(service.url(f"/jobs/{job_id}/stream"), stream=True, timeout=60) as response:
        assert response.status_code == 200, response.text
        return list(iter_events(response))


def test_every_event_the_worker_sends_matches_the_document(service, document):
    seen: dict[str, set[str]] = {}
    events, job_id = read_stream(service, "/stream", {"prompt": "The capital of France is", "max_tokens": 6,
                                                      "temperature": 0})
    seen["/stream"] = check_events(document, "/stream", events)
    seen["/jobs/{job_id}/stream"] = check_events(document, "/jobs/{job_id}/stream", resume(service, job_id), "get")

    events, _ = read_stream(service, "/chat", {"messages": [QUESTION], "max_tokens": 6, "temperature": 0})
    seen["/chat"] = check_events(document, "/chat", events)

    events, beam_id = read_stream(service, "/stream_chat_beam", {"messages": [QUESTION], "beam_width": 2,
                                                                 "max_tokens": 6, "use_rerank": False})
    seen["/stream_chat_beam"] = check_events(document, "/stream_chat_beam", events)
    seen["/jobs/{job_id}/stream"] |= check_events(document, "/jobs/{job_id}/stream", resume(service, beam_id), "get")

    scores = requests.post(service.url("/rerank_scores"), json={
        "messages": [QUESTION], "candidates": ["Paris.", "I like turtles."]}, timeout=300)
    assert scores.status_code == 200, scores.text
    answer_schema = document["paths"]["/rerank_scores"]["post"]["responses"]["200"]["content"]["application/json"]
    validator(document, answer_schema["schema"]).validate(scores.json())
    score_events = resume(service, scores.headers["X-Job-Id"])
    assert [event.event for event in score_events] == ["done"]
    check_events(document, "/jobs/{job_id}/stream", score_events, "get")

    seen["error"] = check_events(document, "/stream", cancelled_stream(service))
    sse_routes = {path for path, item in document["paths"].items() for op in item.values()
                  if "text/event-stream" in op["responses"].get("200", {}).get("content", {})
                  and not path.startswith("/v1/")}
    assert sse_routes == set(seen) - {"error"}, "a native SSE route is not covered by this test"
    documented = {name for path in sse_routes for name in x_events(
        document, path, "get" if path.startswith("/jobs/") else "post")}
    assert set().union(*seen.values()) == documented


def cancelled_stream(service) -> list:
    """A long stream cancelled with DELETE after its first token: the worker ends it with an `error` event."""
    body = {"prompt": "1, 2, 3, 4, 5,", "max_tokens": 400, "temperature": 0}  # counts on: long enough to cancel
    with requests.post(service.url("/stream"), json=body, stream=True, timeout=300) as response:
        assert response.status_code == 200, response.text
        events = []
        for event in iter_events(response):
            events.append(event)
            if len(events) == 1:
                assert requests.delete(service.url(f"/jobs/{response.headers['X-Job-Id']}"), timeout=10).ok
    assert events[-1].event == "error" and events[-1].data["error"]["type"] == "cancelled"
    return events
