"""The service end to end: gunicorn + a real CPU worker + real Redis, over HTTP with real SSE streams."""

from __future__ import annotations

import threading

import pytest
import requests

from tests.sse_client import iter_events

pytestmark = [pytest.mark.integration, pytest.mark.model]

PROMPT = "Write one sentence about the sea."


def open_stream(service, body: dict, path: str = "/stream", headers: dict | None = None):
    response = requests.post(service.url(path), json=body, stream=True, timeout=120, headers=headers)
    assert response.status_code == 200, response.text
    return response


def read_all(response) -> list:
    with response:
        return list(iter_events(response))


def test_stream_tokens_concatenate_to_done_text(service):
    response = open_stream(service, {"prompt": PROMPT, "max_tokens": 24, "temperature": 0})
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    job_id = response.headers["X-Job-Id"]
    events = read_all(response)
    tokens, done = events[:-1], events[-1]
    assert [e.event for e in tokens] == ["token"] * len(tokens) and done.event == "done"
    assert [e.id for e in events] == list(range(1, len(events) + 1))
    assert "".join(e.data["text"] for e in tokens) == done.data["output_text"]
    assert [e.data["token"] for e in tokens] == done.data["output_ids"]
    assert done.data["job_id"] == job_id
    assert done.data["usage"]["completion_tokens"] == len(tokens)
    assert done.data["finish_reason"] in ("length", "eos")


def test_generate_equals_stream_for_the_same_seed(service):
    body = {"prompt": PROMPT, "max_tokens": 20, "temperature": 0.9, "top_p": 0.95, "seed": 1234}
    streamed = read_all(open_stream(service, body))[-1].data
    generated = requests.post(service.url("/generate"), json=body, timeout=120)
    assert generated.status_code == 200, generated.text
    result = generated.json()
    assert result["output_ids"] == streamed["output_ids"]
    assert result["output_text"] == streamed["output_text"]
    assert result["input"] == PROMPT and result["backend"] == "cpu"
    assert result["usage"]["completion_tokens"] == len(result["output_ids"])


def test_reconnect_after_the_job_finished_replays_exactly_the_missing_events(service):
    response = open_stream(service, {"prompt": PROMPT, "max_tokens": 12, "temperature": 0})
    job_id = response.headers["X-Job-Id"]
    original = read_all(response)
    replay_url = service.url(f"/jobs/{job_id}/stream")
    everything = read_all(requests.get(replay_url, stream=True, timeout=60))
    assert [(e.id, e.event, e.data) for e in everything] == [(e.id, e.event, e.data) for e in original]
    after_five = read_all(requests.get(replay_url, headers={"Last-Event-ID": "5"}, stream=True, timeout=60))
    assert [(e.id, e.data) for e in after_five] == [(e.id, e.data) for e in original[5:]]


def test_late_subscriber_to_a_running_job_loses_nothing(service):
    response = open_stream(service, {"prompt": PROMPT, "max_tokens": 48, "temperature": 0})
    job_id = response.headers["X-Job-Id"]
    first_events, late_events = [], []
    events = iter_events(response)
    first_events.extend([next(events), next(events)])
    # A second client joins while the job runs, claiming it saw only the first event.
    late = threading.Thread(target=lambda: late_events.extend(read_all(requests.get(
        service.url(f"/jobs/{job_id}/stream"), headers={"Last-Event-ID": "1"}, stream=True, timeout=120))))
    late.start()
    first_events.extend(events)
    response.close()
    late.join(timeout=120)
    assert first_events[-1].event == "done"
    assert [(e.id, e.data) for e in late_events] == [(e.id, e.data) for e in first_events[1:]]


def test_a_pool_without_workers_gets_503_naming_it(service):
    response = requests.post(service.url("/generate"), json={"prompt": PROMPT, "backend": "gpu"}, timeout=10)
    assert response.status_code == 503
    assert "gpu" in response.json()["error"]["message"]


def test_auto_routes_to_the_cpu_pool_when_no_gpu_worker_lives(service):
    response = requests.post(service.url("/generate"), json={"prompt": PROMPT, "max_tokens": 2, "backend": "auto"},
                             timeout=60)
    assert response.status_code == 200 and response.json()["backend"] == "cpu"


@pytest.mark.parametrize(("body", "field"), [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "temperature": 5}, "temperature"),
    ({"prompt": "hi", "backend": "tpu"}, "backend"),
    ({"prompt": "hi", "colour": "red"}, "colour"),
    ({"prompt": "word " * 5000}, "prompt"),
])
def test_bad_input_gets_a_400_naming_the_field(service, body, field):
    response = requests.post(service.url("/stream"), json=body, timeout=10)
    assert response.status_code == 400
    assert field in response.json()["error"]["message"]


def test_malformed_json_gets_a_400(service):
    response = requests.post(service.url("/generate"), data="{not json", timeout=10,
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["type"]


def test_health_reports_redis_and_workers(service):
    health = requests.get(service.url("/health"), timeout=10)
    assert health.status_code == 200
    assert health.json()["redis"] is True and health.json()["workers"]["cpu"] >= 1
