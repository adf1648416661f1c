"""`GET /health`: 200 with live workers per pool while Redis answers, 503 when it does not."""

from __future__ import annotations

import socket

import pytest

from api import create_app


def test_health_counts_live_workers_per_pool(client, live_worker):
    live_worker("gpu")
    live_worker("cpu")
    live_worker("cpu")
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json == {"status": "ok", "redis": True, "workers": {"gpu": 1, "cpu": 2}}


def test_health_without_workers_is_still_ok(client):
    assert client.get("/health").json == {"status": "ok", "redis": True, "workers": {"gpu": 0, "cpu": 0}}


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
    assert response.json == {"status": "unavailable", "redis": False, "workers": {"gpu": 0, "cpu": 0}}


def test_requests_get_a_503_json_error_when_redis_does_not_answer(redis_down):
    client = create_app(redis_down).test_client()
    response = client.post("/generate", json={"prompt": "Hello"})
    assert response.status_code == 503
    assert response.json["error"]["type"] == "unavailable"
    assert client.get("/jobs/0123456789abcdef0123456789abcdef").status_code == 503
