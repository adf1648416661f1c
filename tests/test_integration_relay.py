"""The relay against a real Redis: one pub/sub connection per API process whatever the number of streams,
nothing lost when that connection is cut, and a stopping gunicorn ending its streams so that clients resume
on another API process. No model is needed: a test publishes the events a worker would."""

from __future__ import annotations

import signal
import threading
import time
import uuid

import pytest
import redis
import requests
from rq import Queue, Worker

from shared.events import EventPublisher, cancel_key
from shared.fanout import EventHub
from shared.protocol import ErrorBody, TokenEvent
from tests.service_fixtures import Service, free_port, own_redis_server, service_environment
from tests.sse_client import iter_events
from tests.test_fanout import follow_in_thread, wait_until_followed
from tests.tiny_tokenizer import make_tokenizer_folder

pytestmark = [pytest.mark.integration]

STREAMS = 50


@pytest.fixture(scope="module")
def redis_url():
    """A redis-server of this module's own: the session's real worker, on the shared test database, must not
    take the jobs these tests play the worker for."""
    with own_redis_server() as server:
        yield server.url


@pytest.fixture
def connection(redis_url):
    """The module's Redis, empty before and after."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.flushdb()


def pubsub_clients(connection: redis.Redis, name: str) -> list[dict]:
    """Redis's record of the connections named `name` that are subscribed to something."""
    return [client for client in connection.client_list() if client["name"] == name and int(client["sub"]) > 0]


def test_one_pubsub_connection_serves_every_stream_and_survives_being_cut(connection, redis_url):
    name = f"relay-test-{uuid.uuid4().hex[:8]}"
    hub = EventHub(redis.Redis.from_url(redis_url, client_name=name))
    jobs = [f"job-{number}" for number in range(STREAMS)]
    publishers = {job_id: EventPublisher(connection, job_id, ttl_s=60) for job_id in jobs}
    readers = [follow_in_thread(hub, job_id) for job_id in jobs]
    wait_until_followed(hub, STREAMS)
    [listener] = pubsub_clients(connection, name)
    assert int(listener["sub"]) == STREAMS + 1  # every job's channel, and the hub's own
    for job_id in jobs:
        publishers[job_id].publish(TokenEvent(token=1, text="a", index=0))
    connection.client_kill_filter(_id=listener["id"])  # a network cut: whatever is published now is not heard
    for job_id in jobs:
        publishers[job_id].publish(TokenEvent(token=2, text="b", index=1))
    deadline = time.monotonic() + 10
    while [int(client["sub"]) for client in pubsub_clients(connection, name)] != [STREAMS + 1]:
        assert time.monotonic() < deadline, "the hub did not subscribe again on a new connection"
        time.sleep(0.05)
    for job_id in jobs:
        publishers[job_id].publish(ErrorBody.of("cancelled", "enough"))
    for thread, _ in readers:
        thread.join(timeout=20)
    assert [[(event.id, event.type) for event in seen] for _, seen in readers] == \
        [[(1, "token"), (2, "token"), (3, "error")]] * STREAMS


@pytest.fixture
def api(connection, redis_url, tmp_path):
    """Starts gunicorn processes (the Procfile's `web`) on the test database, with a registered cpu worker
    that takes nothing (so jobs stay queued while the test plays the worker)."""
    worker = Worker([Queue("cpu", connection=connection)], connection=connection)
    worker.register_birth()
    services: list[Service] = []
    model_dir = make_tokenizer_folder(tmp_path / "tokenizer")

    def start() -> Service:
        port = free_port()
        env = service_environment(port, REDIS_URL=redis_url, MODEL_DIR=str(model_dir), KEEPALIVE_S="1",
                                  WEB_CONCURRENCY="1", MAX_SEQ_LEN="128")
        service = Service(f"http://127.0.0.1:{port}", connection, {}, {})
        service.start("web", env)
        services.append(service)
        service.wait_for_workers("cpu")
        return service

    yield start
    for service in services:
        service.stop_all()
    worker.register_death()


def test_a_stopping_api_ends_its_streams_and_they_resume_on_another(api, connection):
    first = api()
    streams = [requests.post(first.url("/stream"), json={"prompt": "Hello", "max_tokens": 8}, stream=True,
                             timeout=30) for _ in range(3)]
    job_ids = [response.headers["X-Job-Id"] for response in streams]
    for job_id in job_ids:
        EventPublisher(connection, job_id, ttl_s=60).publish(TokenEvent(token=5, text="Hi", index=0))
    received = {job_id: [] for job_id in job_ids}
    readers = [threading.Thread(target=lambda r=response, j=job_id: received[j].extend(iter_events(r)))
               for response, job_id in zip(streams, job_ids)]
    for reader in readers:
        reader.start()
    first.processes["web"].send_signal(signal.SIGTERM)  # a redeploy
    for reader in readers:
        reader.join(timeout=20)
    assert first.processes["web"].wait(timeout=20) == 0
    for job_id in job_ids:
        assert [(event.id, event.event) for event in received[job_id]] == [(1, "token"), (None, "error")]
        assert received[job_id][-1].data["error"]["type"] == "unavailable"
        assert connection.get(cancel_key(job_id)) is None  # not a client leaving: the job goes on

    second = api()
    job_id = job_ids[0]
    with requests.get(second.url(f"/jobs/{job_id}/stream"), headers={"Last-Event-ID": "1"}, stream=True,
                      timeout=30) as response:
        publisher = EventPublisher(connection, job_id, ttl_s=60)
        publisher.next_id = 2
        publisher.publish(TokenEvent(token=6, text=" there", index=1))
        publisher.publish(ErrorBody.of("cancelled", "enough"))
        resumed = [(event.id, event.event) for event in iter_events(response)]
    assert resumed == [(2, "token"), (3, "error")]

