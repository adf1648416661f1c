"""`GET /health`: 200 with ready and starting workers per pool while Redis answers, 503 when it does not."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest

from api import create_app


def test_health_counts_live_workers_per_pool(client, live_worker):
    live_worker("gpu")
    live_worker("cpu")
    live_worker("cpu")
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json == {"status": "ok", "redis": True, "workers": {"gpu": 1, "cpu": 2},
                             "starting": {"gpu": 0, "cpu": 0}}


def test_health_without_workers_is_still_ok(client):
    assert client.get("/health").json == {"status": "ok", "redis": True, "workers": {"gpu": 0, "cpu": 0},
                                          "starting": {"gpu": 0, "cpu": 0}}


def test_health_says_starting_while_the_only_worker_loads_its_model_then_ok(client, starting_worker):
    worker = starting_worker("cpu")
    assert client.get("/health").json == {"status": "starting", "redis": True, "workers": {"gpu": 0, "cpu": 0},
                                          "starting": {"gpu": 0, "cpu": 1}}
    worker.engine = SimpleNamespace(decoder=SimpleNamespace(max_batch_size=32))  # loaded (a stand-in engine)
    worker.register_birth()  # as RQ's bootstrap does before the worker's first job
    assert client.get("/health").json == {"status": "ok", "redis": True, "workers": {"gpu": 0, "cpu": 1},
                                          "starting": {"gpu": 0, "cpu": 0}}


def test_health_is_ok_while_one_pool_serves_and_another_starts(client, live_worker, starting_worker):
    live_worker("cpu")
    starting_worker("gpu")
    starting_worker("cpu")
    assert client.get("/health").json == {"status": "ok", "redis": True, "workers": {"gpu": 0, "cpu": 1},
                                          "starting": {"gpu": 1, "cpu": 1}}


def test_a_starting_worker_that_died_stops_counting(client, redis_client, starting_worker):
    worker = starting_worker("cpu")
    redis_client.delete(worker.key)  # its key expired: no heartbeat for WORKER_DEAD_S
    assert client.get("/health").json["starting"] == {"gpu": 0, "cpu": 0}
    assert client.get("/health").json["status"] == "ok"


@pytest.fixture
def redis_down(app_config) -> dict:
    """Config pointing at a port where nothing listens (bound, so no one else takes it meanwhile)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        config = {key: value for key, value in app_config.items() if key != "REDIS_CLIENT"}
        yield {**config, "REDIS_URL": f"redis://127.0.0.1:{port}/0"}


def test_health_is_503_when_redis_does_not_answer(redis_down):
    response = create_app(redis_down).test_client().get("/health")
    assert response.status_code == 503
    assert response.json == {"status": "unavailable", "redis": False, "workers": {"gpu": 0, "cpu": 0},
                             "starting": {"gpu": 0, "cpu": 0}}


def test_requests_get_a_503_json_error_when_redis_does_not_answer(redis_down):
    client = create_app(redis_down).test_client()
    response = client.post("/generate", json={"prompt": "Hello"})
    assert response.status_code == 503
    assert response.json["error"]["type"] == "unavailable"
    assert client.get("/jobs/0123456789abcdef0123456789abcdef").status_code == 503
