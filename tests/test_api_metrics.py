"""`/metrics` on the app (one process, fakeredis): requests by route and status, the pools read from Redis at
scrape time, the workers' snapshots merged with their labels, and a Redis that does not answer."""

from __future__ import annotations

import json

import pytest
import redis
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from api import create_app
from shared.metrics import WORKER_SET, worker_key
from tests.fixtures_jobs import enqueue_job
from workers.metrics import WorkerMetrics


def requests_counted(route: str, method: str, status: int) -> float:
    value = REGISTRY.get_sample_value("llm_http_requests_total", {"route": route, "method": method,
                                                                   "status": str(status)})
    return value or 0.0


def scrape(client) -> dict[str, list]:
    """Metric family name -> its samples, from one scrape."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain; version=0.0.4")
    return {family.name: family.samples for family in text_string_to_metric_families(response.get_data(as_text=True))}


def sample(families: dict, name: str, **labels) -> float | None:
    for family_samples in families.values():
        for found in family_samples:
            if found.name == name and all(found.labels.get(k) == v for k, v in labels.items()):
                return found.value
    return None


def test_requests_are_counted_by_route_template_method_and_status(client):
    before = {key: requests_counted(*key) for key in [("/tokenize", "POST", 200), ("/tokenize", "POST", 400),
                                                       ("/jobs/<job_id>", "GET", 404), ("unmatched", "GET", 404)]}
    for _ in range(3):
        client.post("/tokenize", json={"text": "Hello"})
    client.post("/tokenize", json={"text": 5})
    client.get("/jobs/0123456789abcdef0123456789abcdef")
    client.get("/no/such/path/" + "x" * 40)
    assert requests_counted("/tokenize", "POST", 200) - before[("/tokenize", "POST", 200)] == 3
    assert requests_counted("/tokenize", "POST", 400) - before[("/tokenize", "POST", 400)] == 1
    assert requests_counted("/jobs/<job_id>", "GET", 404) - before[("/jobs/<job_id>", "GET", 404)] == 1
    assert requests_counted("unmatched", "GET", 404) - before[("unmatched", "GET", 404)] == 1


def test_429s_are_counted_under_their_status(app_config, live_worker):
    app = create_app({**app_config, "API_KEYS": "sk-one", "MAX_CONCURRENT_PER_KEY": 1})
    client = app.test_client()
    live_worker("cpu")
    before = requests_counted("/generate", "POST", 429)
    held = client.post("/stream", json={"prompt": "Hi"}, headers={"Authorization": "Bearer sk-one"}, buffered=False)
    assert client.post("/generate", json={"prompt": "Hi"},
                       headers={"Authorization": "Bearer sk-one"}).status_code == 429
    held.close()
    assert requests_counted("/generate", "POST", 429) - before == 1


def test_a_closed_response_observes_its_duration_and_leaves_in_progress(client):
    labels = {"route": "/health", "method": "GET"}
    count_before = REGISTRY.get_sample_value("llm_http_request_duration_seconds_count", labels) or 0
    response = client.get("/health")
    in_progress = REGISTRY.get_sample_value("llm_http_requests_in_progress")
    response.close()
    assert REGISTRY.get_sample_value("llm_http_request_duration_seconds_count", labels) == count_before + 1
    assert REGISTRY.get_sample_value("llm_http_requests_in_progress") == in_progress - 1


def test_cancellations_are_counted_by_reason(client, redis_client):
    before = REGISTRY.get_sample_value("llm_job_cancellations_total", {"reason": "requested"}) or 0
    job_id = enqueue_job(redis_client)
    assert client.delete(f"/jobs/{job_id}").status_code == 200
    assert REGISTRY.get_sample_value("llm_job_cancellations_total", {"reason": "requested"}) == before + 1


def test_the_pools_are_read_from_redis_at_scrape_time(client, redis_client, live_worker):
    live_worker("cpu")
    live_worker("cpu")
    enqueue_job(redis_client)
    families = scrape(client)
    assert sample(families, "llm_redis_up") == 1
    assert sample(families, "llm_queue_depth", pool="cpu", lane="interactive") == 1
    assert sample(families, "llm_queue_depth", pool="cpu", lane="batch") == 0
    assert sample(families, "llm_queue_depth", pool="gpu", lane="interactive") == 0
    assert sample(families, "llm_live_workers", pool="cpu", state="ready") == 2
    assert sample(families, "llm_live_workers", pool="gpu", state="ready") == 0


def test_workers_snapshots_are_merged_with_their_worker_and_pool(client, redis_client):
    first, second = WorkerMetrics(), WorkerMetrics()
    first.generation_tokens.inc(7)
    first.step.observe(0.02)
    second.generation_tokens.inc(5)
    second.batch_size.set(3)
    second.finished.labels("eos").inc()
    first.push(redis_client, "w1", ["cpu"], ttl_s=10)
    second.push(redis_client, "w2", ["gpu"], ttl_s=10)
    families = scrape(client)
    assert sample(families, "llm_generation_tokens_total", worker="w1", pool="cpu") == 7
    assert sample(families, "llm_generation_tokens_total", worker="w2", pool="gpu") == 5
    assert sample(families, "llm_worker_batch_size", worker="w2") == 3
    assert sample(families, "llm_worker_step_duration_seconds_count", worker="w1") == 1
    assert sample(families, "llm_worker_step_duration_seconds_bucket", worker="w1", le="0.025") == 1
    assert sample(families, "llm_jobs_finished_total", worker="w2", reason="eos") == 1
    types = {family.name: family.type for family in text_string_to_metric_families(
        client.get("/metrics").get_data(as_text=True))}
    assert types["llm_generation_tokens"] == "counter" and types["llm_worker_step_duration_seconds"] == "histogram"
    # One family per metric, whatever the number of workers (the exposition format wants them grouped).
    text = client.get("/metrics").get_data(as_text=True)
    assert text.count("# TYPE llm_generation_tokens_total counter") == 1


def test_an_expired_snapshot_leaves_the_scrape(client, redis_client):
    WorkerMetrics().push(redis_client, "gone", ["cpu"], ttl_s=10)
    redis_client.delete(worker_key("gone"))  # as its TTL would, once the worker stops beating
    assert sample(scrape(client), "llm_worker_batch_size", worker="gone") is None
    assert not redis_client.sismember(WORKER_SET, "gone")


def test_a_snapshot_is_json_with_the_exposition_text(redis_client):
    WorkerMetrics().push(redis_client, "w", ["cpu", "gpu"], ttl_s=7)
    data = json.loads(redis_client.get(worker_key("w")))
    assert data["worker"] == "w" and data["pools"] == "cpu,gpu" and "llm_worker_batch_size" in data["metrics"]
    assert 0 < redis_client.ttl(worker_key("w")) <= 7


def test_a_scrape_without_redis_says_so_and_still_answers(app_config):
    down = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    client = create_app({**app_config, "REDIS_CLIENT": down}).test_client()
    families = scrape(client)
    assert sample(families, "llm_redis_up") == 0
    assert "llm_http_requests" in families


@pytest.mark.parametrize("route", ["/metrics"])
def test_metrics_is_documented(client, route):
    assert "get" in client.get("/openapi.json").json["paths"][route]
