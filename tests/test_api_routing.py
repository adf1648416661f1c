"""Which pool runs a request: `backend` field over BACKEND_MODE, `auto` preferring a live GPU worker."""

from __future__ import annotations

import pytest

from api import create_app
from tests.fixtures_jobs import ScriptedWorker, queued_jobs


def generate(client, redis_client, pool: str, **body) -> dict:
    """POST /generate while a scripted worker serves `pool`; the JSON answer."""
    worker = ScriptedWorker(redis_client, pool)
    worker.start()
    response = client.post("/generate", json={"prompt": "Hello", "max_tokens": 2, **body})
    worker.finish()
    assert response.status_code == 200, response.json
    return response.json


def test_auto_picks_gpu_when_a_gpu_worker_is_live(client, redis_client, live_worker):
    live_worker("gpu")
    live_worker("cpu")
    assert generate(client, redis_client, "gpu")["backend"] == "gpu"


def test_auto_falls_back_to_cpu_without_a_gpu_worker(client, redis_client, live_worker):
    live_worker("cpu")
    assert generate(client, redis_client, "cpu", backend="auto")["backend"] == "cpu"


def test_a_gpu_worker_that_has_died_no_longer_attracts_jobs(client, redis_client, live_worker):
    live_worker("gpu").register_death()
    live_worker("cpu")
    assert generate(client, redis_client, "cpu")["backend"] == "cpu"


def test_request_backend_overrides_auto(client, redis_client, live_worker):
    live_worker("gpu")
    live_worker("cpu")
    assert generate(client, redis_client, "cpu", backend="cpu")["backend"] == "cpu"


def test_backend_mode_setting_applies_when_the_request_names_none(app_config, redis_client, live_worker):
    live_worker("gpu")
    live_worker("cpu")
    client = create_app({**app_config, "BACKEND_MODE": "cpu"}).test_client()
    assert generate(client, redis_client, "cpu")["backend"] == "cpu"


@pytest.mark.parametrize(("live", "body", "named"), [
    pytest.param(["cpu"], {"backend": "gpu"}, "gpu", id="gpu-asked-only-cpu-live"),
    pytest.param(["gpu"], {"backend": "cpu"}, "cpu", id="cpu-asked-only-gpu-live"),
    pytest.param([], {}, "cpu", id="auto-nothing-live"),
])
@pytest.mark.parametrize("path", ["/generate", "/stream"])
def test_a_pool_without_live_workers_is_a_503_naming_it(client, redis_client, live_worker, live, body, named, path):
    for pool in live:
        live_worker(pool)
    response = client.post(path, json={"prompt": "Hello", **body})
    assert response.status_code == 503
    assert response.json["error"]["type"] == "no_worker"
    assert f"'{named}'" in response.json["error"]["message"]
    assert queued_jobs(redis_client, "cpu") == queued_jobs(redis_client, "gpu") == 0


@pytest.mark.parametrize("body", [{}, {"backend": "cpu"}], ids=["auto", "cpu"])
def test_a_request_for_a_pool_whose_only_worker_is_starting_waits_in_its_queue(client, redis_client,
                                                                               starting_worker, body):
    starting_worker("cpu")  # registered, still loading its model
    response = client.post("/stream", json={"prompt": "Hello", **body}, buffered=False)
    assert response.status_code == 200 and response.headers["X-Job-Id"]
    assert queued_jobs(redis_client, "cpu") == 1  # queued for the worker, not refused with a 503
    response.close()


def test_auto_prefers_a_ready_pool_to_a_starting_one(client, redis_client, live_worker, starting_worker):
    starting_worker("gpu")
    live_worker("cpu")
    assert generate(client, redis_client, "cpu")["backend"] == "cpu"


def test_auto_waits_for_a_starting_gpu_worker_first_when_no_pool_is_ready(client, redis_client, starting_worker):
    starting_worker("cpu")
    starting_worker("gpu")
    assert generate(client, redis_client, "gpu")["backend"] == "gpu"
