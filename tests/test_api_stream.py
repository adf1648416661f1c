"""SSE: `POST /stream` and `GET /jobs/<id>/stream` frames, headers, replay after Last-Event-ID, endings."""

from __future__ import annotations

import threading

import pytest
from rq.job import Job, JobStatus

from api import create_app
from shared.events import EventPublisher, cancel_key, follow
from shared.fanout import EventHub
from shared.protocol import DoneEvent, TokenEvent, Usage
from tests.fixtures_jobs import SCRIPT, ScriptedWorker, enqueue_job, publish_generation, queued_jobs
from tests.sse_client import parse_sse


def test_stream_relays_the_job_as_sse_frames(client, redis_client, live_worker):
    live_worker("cpu")
    worker = ScriptedWorker(redis_client, "cpu")
    worker.start()
    response = client.post("/stream", json={"prompt": "Hello", "max_tokens": 3})
    worker.finish()
    assert response.status_code == 200
    assert response.mimetype == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    job_id = response.headers["X-Job-Id"]
    assert len(job_id) == 32 and int(job_id, 16) >= 0
    body = response.get_data(as_text=True)
    assert body.startswith(": keep-alive\n\n")
    assert body.split("\n\n")[1] == f'id: 1\nevent: token\ndata: {{"token":{SCRIPT[0][0]},"text":"Hello","index":0}}'
    events, _ = parse_sse(body)
    assert [(e["id"], e["event"]) for e in events] == [(1, "token"), (2, "token"), (3, "token"), (4, "done")]
    assert [e["data"]["text"] for e in events[:-1]] == ["Hello", ",", " world"]
    done = events[-1]["data"]
    assert done["job_id"] == job_id and done["output_text"] == "Hello, world"
    assert done["output_ids"] == [token for token, _ in SCRIPT[:3]]
    assert done["finish_reason"] == "length" and done["usage"]["completion_tokens"] == 3


def replay(client, job_id: str, **kwargs) -> list[tuple[int, str, dict]]:
    response = client.get(f"/jobs/{job_id}/stream", **kwargs)
    assert response.status_code == 200 and response.mimetype == "text/event-stream"
    assert response.headers["X-Job-Id"] == job_id
    return [(e["id"], e["event"], e["data"]) for e in parse_sse(response.get_data(as_text=True))[0]]


@pytest.mark.parametrize("after", [0, 2, 4])
def test_last_event_id_replays_exactly_the_events_after_it(client, redis_client, after):
    publish_generation(redis_client, "finishedjob", [1, 2])  # 4 tokens + done: ids 1..5
    everything = replay(client, "finishedjob")
    assert [event_id for event_id, _, _ in everything] == [1, 2, 3, 4, 5]
    assert replay(client, "finishedjob", headers={"Last-Event-ID": str(after)}) == everything[after:]
    assert replay(client, "finishedjob", query_string={"last_event_id": after}) == everything[after:]


@pytest.mark.parametrize("after", [5, 9])
def test_a_client_that_saw_the_end_gets_204_so_it_stops_reconnecting(client, redis_client, after):
    publish_generation(redis_client, "finishedjob", [1, 2])  # ids 1..5, 5 is `done`
    response = client.get("/jobs/finishedjob/stream", headers={"Last-Event-ID": str(after)})
    assert response.status_code == 204
    assert response.get_data() == b""


def test_follow_after_the_terminal_event_yields_nothing(redis_client):
    publish_generation(redis_client, "finishedjob", [1, 2])
    assert list(follow(EventHub(redis_client), "finishedjob", 5, keepalive_s=0.01, is_alive=lambda: True)) == []


def test_resumed_stream_replays_the_backlog_then_follows_live(client, redis_client):
    job_id = enqueue_job(redis_client)
    publisher = EventPublisher(redis_client, job_id, ttl_s=60)
    for index, (token, text) in enumerate(SCRIPT[:2]):
        publisher.publish(TokenEvent(token=token, text=text, index=index))

    def finish_job():  # the worker goes on while the client reads: no event may be lost or repeated
        for index, (token, text) in enumerate(SCRIPT[2:], start=2):
            publisher.publish(TokenEvent(token=token, text=text, index=index))
        publisher.publish(DoneEvent(job_id=job_id, output_text="Hello, world!",
                                    output_ids=[token for token, _ in SCRIPT], finish_reason="eos",
                                    usage=Usage(prompt_tokens=3, completion_tokens=len(SCRIPT))))

    live = threading.Thread(target=finish_job)
    live.start()
    events = replay(client, job_id, headers={"Last-Event-ID": "1"})
    live.join()
    assert [(event_id, kind) for event_id, kind, _ in events] == [(2, "token"), (3, "token"), (4, "token"), (5, "done")]
    assert "".join(data["text"] for _, kind, data in events if kind == "token") == ", world!"


def test_resuming_an_unknown_job_is_a_404(client):
    response = client.get("/jobs/0123456789abcdef0123456789abcdef/stream")
    assert response.status_code == 404
    assert response.json["error"]["type"] == "not_found"


@pytest.mark.parametrize("bad", ["abc", "-1", "1.5", "+1", " 1", "1_0", "\u0661", ""])
def test_a_malformed_last_event_id_is_a_400(client, redis_client, bad):
    publish_generation(redis_client, "finishedjob", [1])
    response = client.get("/jobs/finishedjob/stream", headers={"Last-Event-ID": bad})
    assert response.status_code == 400
    assert response.json["error"]["field"] == "Last-Event-ID"


@pytest.mark.parametrize("fate", ["failed", "vanished"])
def test_a_job_that_fails_without_a_result_ends_the_stream_with_an_error(app_config, redis_client, fate):
    client = create_app({**app_config, "KEEPALIVE_S": 0.05}).test_client()
    job_id = enqueue_job(redis_client)
    EventPublisher(redis_client, job_id, ttl_s=60).publish(TokenEvent(token=5, text="Hi", index=0))
    job = Job.fetch(job_id, connection=redis_client)
    if fate == "failed":
        job.set_status(JobStatus.FAILED)
    else:
        job.delete()
    events, comments = parse_sse(client.get(f"/jobs/{job_id}/stream").get_data(as_text=True))
    assert [e["event"] for e in events] == ["token", "error"]
    assert events[-1]["data"]["error"]["type"] == "job_lost"
    assert comments  # keep-alives went out while the API waited


def test_a_queued_job_whose_pool_has_no_live_worker_left_ends_with_no_worker(app_config, redis_client, live_worker):
    client = create_app({**app_config, "KEEPALIVE_S": 0.05}).test_client()
    worker = live_worker("cpu")
    job_id = enqueue_job(redis_client)
    redis_client.delete(worker.key)  # the pool's last worker died after the job was accepted (its key expired)
    events, _ = parse_sse(client.get(f"/jobs/{job_id}/stream").get_data(as_text=True))
    assert [e["event"] for e in events] == ["error"] and events[0]["data"]["error"]["type"] == "no_worker"
    assert events[0]["id"] == 1  # in the backlog: a client resuming later is told the same
    assert Job.fetch(job_id, connection=redis_client).get_status() == JobStatus.CANCELED


def test_a_queued_job_whose_only_worker_dies_while_starting_ends_with_no_worker(app_config, redis_client,
                                                                              starting_worker):
    worker = starting_worker("cpu")
    client = create_app({**app_config, "KEEPALIVE_S": 0.05}).test_client()
    response = client.post("/stream", json={"prompt": "Hello"}, buffered=False)
    frames = response.iter_encoded()
    assert [next(frames) for _ in range(3)] == [b": keep-alive\n\n"] * 3  # waiting for the worker to load
    redis_client.delete(worker.key)  # it died while loading: its key expired after WORKER_DEAD_S
    events, _ = parse_sse(b"".join(frames).decode())
    assert [e["event"] for e in events] == ["error"] and events[0]["data"]["error"]["type"] == "no_worker"
    assert Job.fetch(response.headers["X-Job-Id"], connection=redis_client).get_status() == JobStatus.CANCELED


def test_a_queued_job_waits_while_its_pool_has_a_live_worker(app_config, redis_client, live_worker):
    live_worker("cpu")
    client = create_app({**app_config, "KEEPALIVE_S": 0.05}).test_client()
    job_id = enqueue_job(redis_client)
    response = client.get(f"/jobs/{job_id}/stream", buffered=False)
    frames = response.iter_encoded()
    assert [next(frames) for _ in range(5)] == [b": keep-alive\n\n"] * 5  # alive checks passed meanwhile
    response.close()


def test_a_client_leaving_the_stream_cancels_its_job(client, redis_client, live_worker):
    live_worker("cpu")  # registered, but nothing takes the job: it stays queued
    response = client.post("/stream", json={"prompt": "Hello"}, buffered=False)
    job_id = response.headers["X-Job-Id"]
    assert next(response.iter_encoded()) == b": keep-alive\n\n"
    response.close()  # what the server does when the client has gone
    assert redis_client.get(cancel_key(job_id)) == b"1"
    assert redis_client.ttl(cancel_key(job_id)) > 0
    assert queued_jobs(redis_client) == 0
    assert client.get(f"/jobs/{job_id}").json["status"] == "canceled"


def test_a_client_that_read_to_the_end_cancels_nothing(client, redis_client, live_worker):
    live_worker("cpu")
    worker = ScriptedWorker(redis_client, "cpu")
    worker.start()
    response = client.post("/stream", json={"prompt": "Hello", "max_tokens": 1}, buffered=False)
    body = b"".join(response.iter_encoded())
    response.close()
    worker.finish()
    assert b"event: done" in body
    assert redis_client.get(cancel_key(response.headers["X-Job-Id"])) is None
