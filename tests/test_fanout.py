"""The event hub: one pub/sub connection per process fanned out to its streams, in process on fakeredis
(tests/test_integration_relay.py counts real Redis connections and restarts them)."""

from __future__ import annotations

import threading
from contextlib import closing

import pytest

from api import create_app
from api.extensions import interrupt_streams
from shared.events import EventPublisher, follow
from shared.fanout import EventHub, StreamInterrupted
from shared.protocol import ErrorBody, TokenEvent
from tests.fixtures_jobs import publish_generation
from tests.sse_client import parse_sse


def follow_in_thread(hub: EventHub, job_id: str, **kwargs) -> tuple[threading.Thread, list]:
    """Follow a job on a thread; its events (or the exception that ended it) land in the returned list."""
    seen: list = []

    def run():
        try:
            seen.extend(event for event in follow(hub, job_id, keepalive_s=0.2, **kwargs) if event is not None)
        except Exception as exc:  # noqa: BLE001 - the test looks at what ended the stream
            seen.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, seen


def wait_until_followed(hub: EventHub, channels: int) -> None:
    """Block until the hub's streams follow `channels` channels (they subscribed and read their backlog)."""
    for _ in range(500):
        if hub.followed_channels() == channels:
            return
        threading.Event().wait(0.01)
    raise AssertionError(f"the hub follows {hub.followed_channels()} channels, not {channels}")


def test_streams_of_one_hub_each_get_every_event_of_their_job_in_order(redis_client):
    hub = EventHub(redis_client)
    readers = [follow_in_thread(hub, job_id) for job_id in ("job-a", "job-a", "job-b")]
    wait_until_followed(hub, 2)
    publish_generation(redis_client, "job-a", [1, 2])  # 4 tokens + done
    publish_generation(redis_client, "job-b", [1], max_tokens=2)  # 2 tokens + done
    for thread, _ in readers:
        thread.join(timeout=10)
    assert [[event.id for event in seen] for _, seen in readers] == [[1, 2, 3, 4, 5]] * 2 + [[1, 2, 3]]
    assert readers[2][1][-1].type == "done"
    wait_until_followed(hub, 0)  # every stream ended: nothing is followed any more


def test_a_stream_that_joins_late_reads_the_backlog_then_follows_live(redis_client):
    hub = EventHub(redis_client)
    publisher = EventPublisher(redis_client, "job-a", ttl_s=60)
    publisher.publish(TokenEvent(token=5, text="Hi", index=0))
    thread, seen = follow_in_thread(hub, "job-a")
    wait_until_followed(hub, 1)
    publisher.publish(TokenEvent(token=6, text=" there", index=1))
    publisher.publish(ErrorBody.of("cancelled", "enough"))
    thread.join(timeout=10)
    assert [(event.id, event.type) for event in seen] == [(1, "token"), (2, "token"), (3, "error")]
    assert [event.data["text"] for event in seen[:2]] == ["Hi", " there"]


def test_interrupting_ends_resumable_streams_and_leaves_the_others(redis_client):
    hub = EventHub(redis_client)
    resumable, seen_resumable = follow_in_thread(hub, "job-a", resumable=True)
    blocking, seen_blocking = follow_in_thread(hub, "job-a")
    wait_until_followed(hub, 1)
    assert hub.interrupt_streams() == 1
    resumable.join(timeout=10)
    assert len(seen_resumable) == 1 and isinstance(seen_resumable[0], StreamInterrupted)
    assert blocking.is_alive()  # a blocking answer is still being collected: it finishes
    publish_generation(redis_client, "job-a", [1], max_tokens=1)
    blocking.join(timeout=10)
    assert [event.type for event in seen_blocking] == ["token", "done"]
    with pytest.raises(StreamInterrupted), closing(follow(hub, "job-b", resumable=True)) as late:
        next(late)  # a stream starting while the process stops ends at once too


def test_a_stopping_api_ends_open_streams_with_an_error_the_client_can_resume_from(app_config, redis_client,
                                                                                    live_worker):
    live_worker("cpu")
    app = create_app(app_config)
    client = app.test_client()
    response = client.post("/stream", json={"prompt": "Hello"}, buffered=False)
    job_id = response.headers["X-Job-Id"]
    frames = response.iter_encoded()
    assert next(frames) == b": keep-alive\n\n"
    publisher = EventPublisher(redis_client, job_id, ttl_s=60)
    publisher.publish(TokenEvent(token=5, text="Hi", index=0))
    interrupt_streams(app)
    events, _ = parse_sse(b"".join(frames).decode())
    response.close()
    assert [(event["id"], event["event"]) for event in events] == [(1, "token"), (None, "error")]
    assert events[-1]["data"]["error"]["type"] == "unavailable"
    assert "Last-Event-ID" in events[-1]["data"]["error"]["message"]
    assert client.get(f"/jobs/{job_id}").json["status"] == "queued"  # the job goes on: nothing cancelled it
