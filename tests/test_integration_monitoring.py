"""`/metrics` and the logs through real processes: counts of two gunicorn processes that add up exactly to the
requests sent, 429s counted under their status, the worker's metrics pushed through Redis, JSON log lines with
the request and job ids from the API and the worker, and the human-readable default."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from tests.secured_fleet import ALICE, CAROL, PER_KEY_LIMIT, bearer
from tests.service_fixtures import Service, free_port, service_environment
from tests.sse_client import iter_events

pytestmark = [pytest.mark.integration, pytest.mark.model]

COUNTING = "1, 2, 3, 4, 5,"


def scrape(url: str) -> dict[tuple, float]:
    """(sample name, its labels) -> value, from one GET /metrics."""
    response = requests.get(url + "/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def total(samples: dict[tuple, float], name: str, **labels) -> float:
    """The sum of `name` over every sample whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(value for (sample, sample_labels), value in samples.items()
               if sample == name and wanted <= sample_labels)


def per_process(metrics_dir: Path, **labels) -> dict[int, float]:
    """llm_http_requests_total with `labels`, as each gunicorn process's own file holds it (pid -> count)."""
    counts = {}
    for path in metrics_dir.glob("counter_*.db"):
        with tempfile.TemporaryDirectory() as alone:
            shutil.copy(path, alone)
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=alone)
            samples = {(s.name, frozenset(s.labels.items())): s.value
                       for family in registry.collect() for s in family.samples}
        counts[int(path.stem.split("_")[1])] = total(samples, "llm_http_requests_total", **labels)
    return counts


def test_two_gunicorn_processes_counts_add_up_exactly_to_the_requests_sent(secured):
    """Open and refused requests (no key, so no per-key lease to wait for), many at once on new connections."""
    health = {"route": "/health", "method": "GET", "status": "200"}
    refused = {"route": "/tokenize", "method": "POST", "status": "401"}
    before = scrape(secured.url(""))
    processes_before = per_process(secured.metrics_dir, **health)
    sent: Counter = Counter()

    def get_health(_: int) -> int:  # a new connection each: the kernel hands it to either process
        return requests.get(secured.url("/health"), timeout=30).status_code

    def tokenize_without_key(_: int) -> int:
        return requests.post(secured.url("/tokenize"), json={"text": "x"}, timeout=30).status_code

    with ThreadPoolExecutor(8) as pool:
        for _ in range(20):  # until both processes have served some (at most 20 rounds)
            sent.update(("health", status) for status in pool.map(get_health, range(24)))
            sent.update(("tokenize", status) for status in pool.map(tokenize_without_key, range(8)))
            served = per_process(secured.metrics_dir, **health)
            if sum(count > processes_before.get(pid, 0) for pid, count in served.items()) >= 2:
                break
    assert set(sent) == {("health", 200), ("tokenize", 401)}
    grew = {pid: count - processes_before.get(pid, 0) for pid, count in served.items()}
    assert sum(delta > 0 for delta in grew.values()) == 2, f"one process served everything: {grew}"
    assert sum(grew.values()) == sent[("health", 200)]
    for _ in range(4):  # each scrape may be answered by either process: every one adds up both
        after = scrape(secured.url(""))
        assert total(after, "llm_http_requests_total", **health) - total(
            before, "llm_http_requests_total", **health) == sent[("health", 200)]
        assert total(after, "llm_http_requests_total", **refused) - total(
            before, "llm_http_requests_total", **refused) == sent[("tokenize", 401)]
    durations = total(after, "llm_http_request_duration_seconds_count", route="/health", method="GET")
    assert durations - total(before, "llm_http_request_duration_seconds_count", route="/health",
                             method="GET") == sent[("health", 200)]


def test_429s_are_counted_under_their_status(secured):
    refused_label = {"route": "/generate", "method": "POST", "status": "429"}
    before = total(scrape(secured.url("")), "llm_http_requests_total", **refused_label)
    held = [requests.post(secured.url("/stream"), json={"prompt": COUNTING, "max_tokens": 300}, stream=True,
                          headers=bearer(CAROL), timeout=120) for _ in range(PER_KEY_LIMIT)]
    try:
        refusals = [requests.post(secured.url("/generate"), json={"prompt": "Hi"}, headers=bearer(CAROL),
                                  timeout=30).status_code for _ in range(3)]
    finally:
        for response in held:
            response.close()
    assert refusals == [429, 429, 429]
    assert total(scrape(secured.url("")), "llm_http_requests_total", **refused_label) - before == 3


def settled(url: str, timeout_s: float = 60) -> dict[tuple, float]:
    """A scrape once the worker is idle and its snapshots have stopped changing (it pushes every second)."""
    deadline = time.monotonic() + timeout_s
    previous = None
    while time.monotonic() < deadline:
        samples = scrape(url)
        tokens = total(samples, "llm_generation_tokens_total")
        if total(samples, "llm_worker_batch_size") == 0 and previous == tokens:
            return samples
        previous = tokens
        time.sleep(1.5)
    raise AssertionError("the worker's metrics did not settle")


def test_the_worker_s_metrics_come_through_the_api(secured):
    before = settled(secured.url(""))
    usages = []
    for max_tokens in (5, 9):
        body = {"prompt": COUNTING, "max_tokens": max_tokens, "temperature": 0}
        with requests.post(secured.url("/stream"), json=body, headers=bearer(ALICE), stream=True,
                           timeout=120) as response:
            usages.append(list(iter_events(response))[-1].data["usage"])
    generated = sum(usage["completion_tokens"] for usage in usages)
    deadline = time.monotonic() + 30
    while True:  # the worker pushes on its heartbeat
        after = scrape(secured.url(""))
        if total(after, "llm_generation_tokens_total") - total(before, "llm_generation_tokens_total") == generated:
            break
        assert time.monotonic() < deadline, (f"the worker's tokens never showed up: {generated} sent, counted "
                                             f"{total(after, 'llm_generation_tokens_total')} - "
                                             f"{total(before, 'llm_generation_tokens_total')}")
        time.sleep(0.3)

    def grew(name: str, **labels) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert grew("llm_prompt_tokens_total") == sum(usage["prompt_tokens"] for usage in usages)
    for histogram in ("llm_time_to_first_token_seconds", "llm_e2e_request_latency_seconds", "llm_queue_wait_seconds"):
        assert grew(histogram + "_count") == 2, histogram
        assert grew(histogram + "_sum") > 0
    assert grew("llm_inter_token_latency_seconds_count") == generated - 2
    assert grew("llm_jobs_finished_total") == 2
    assert grew("llm_worker_step_duration_seconds_count") >= generated - 2
    worker_labels = {labels for (name, labels) in after if name == "llm_generation_tokens_total"}
    assert len(worker_labels) == 1 and ("pool", "cpu") in next(iter(worker_labels))
    assert total(after, "llm_live_workers", pool="cpu", state="ready") == 1
    assert total(after, "llm_queue_depth", pool="cpu") == 0
    assert total(after, "llm_worker_kv_positions_limit") == 32768 and total(after, "llm_redis_up") == 1


def test_json_log_lines_carry_the_request_and_job_ids_from_api_to_worker(secured):
    request_id = f"trace-{uuid.uuid4().hex[:12]}"
    body = {"prompt": COUNTING, "max_tokens": 4, "temperature": 0}
    with requests.post(secured.url("/stream"), json=body, headers={**bearer(ALICE), "X-Request-Id": request_id},
                       stream=True, timeout=120) as response:
        assert response.headers["X-Request-Id"] == request_id
        job_id = response.headers["X-Job-Id"]
        assert list(iter_events(response))[-1].event == "done"
    made_up = requests.post(secured.url("/tokenize"), json={"text": "x"}, headers=bearer(ALICE), timeout=10)
    assert re.fullmatch(r"[0-9a-f]{32}", made_up.headers["X-Request-Id"])
    time.sleep(1)  # the access line is written once the response is closed; the worker's lines as it settles

    web = [json.loads(line) for line in secured.log_lines("web")]  # every line is JSON, gunicorn's own too
    mine = [line for line in web if line.get("request_id") == request_id]
    assert {line["logger"] for line in mine} >= {"api.jobs.tracking", "api.access"}
    assert all(line["job_id"] == job_id for line in mine)
    access = next(line for line in mine if line["logger"] == "api.access")
    assert (access["status"], access["path"], access["key"]) == (200, "/stream", "alice")
    assert access["duration_s"] > 0 and access["level"] == "INFO" and access["time"].endswith("+00:00")
    assert any(line["logger"] == "gunicorn.error" for line in web)

    worker = [json.loads(line) for line in secured.log_lines("cpu")]  # RQ's lines and ours
    about_the_job = [line for line in worker if line.get("job_id") == job_id]
    assert about_the_job, "no worker line carries the job id"
    assert all(line["request_id"] == request_id for line in about_the_job)


def test_logs_are_human_readable_by_default(secured, tmp_path):
    """A gunicorn with the Procfile's defaults (as `bin/run` starts it): text lines, with the ids at the end."""
    port = free_port()
    env = service_environment(port, REDIS_URL=secured.service.env["REDIS_URL"])
    env.pop("LOG_FORMAT", None)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    plain = Service(f"http://127.0.0.1:{port}", secured.service.redis, {}, {})
    try:
        plain.start("web", env, name="plain-web")
        deadline = time.monotonic() + 60
        while True:
            try:
                response = requests.post(plain.url("/tokenize"), json={"text": "x"}, timeout=5,
                                         headers={"X-Request-Id": "plain-1"})
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert response.status_code == 200
        assert total(scrape(plain.url("")), "llm_http_requests_total", route="/tokenize") == 1  # its own folder
        time.sleep(0.5)
    finally:
        plain.stop_all()
    lines = plain.logs["plain-web"].read_text().splitlines()
    assert not any(line.startswith("{") for line in lines)
    assert any(re.search(r" INFO gunicorn\.error \[\d+\]: Starting gunicorn", line) for line in lines)
    access = [line for line in lines if " api.access " in line]
    assert len(access) == 1 and re.search(r"INFO api\.access \[\d+\]: POST /tokenize 200 [\d.]+s \[request_id=plain-1",
                                          access[0])
