"""Continuous batching through the real stack: many streams on one CPU worker, joins and cancellations."""

from __future__ import annotations

import threading
import time

import pytest
import requests
from rq import Queue
from rq.job import JobStatus
from rq.registry import CanceledJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from shared.events import read_backlog
from tests.sse_client import iter_events

pytestmark = [pytest.mark.integration, pytest.mark.model]


def stream_events(service, body: dict) -> tuple[str, list]:
    response = requests.post(service.url("/stream"), json=body, stream=True, timeout=300)
    assert response.status_code == 200, response.text
    with response:
        return response.headers["X-Job-Id"], list(iter_events(response))


def generate(service, body: dict) -> dict:
    response = requests.post(service.url("/generate"), json=body, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()


def wait_for_status(service, job_id: str, statuses: set, timeout_s: float = 60) -> JobStatus:
    queue = Queue("cpu", connection=service.redis, serializer=JSONSerializer)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = queue.fetch_job(job_id).get_status()
        if status in statuses:
            return status
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {status} after {timeout_s} s")


def test_32_concurrent_streams_each_get_their_own_text(service):
    prompts = [f"Give me one fact about the number {i}." for i in range(32)]
    results: dict[int, tuple[str, list]] = {}
    start = threading.Barrier(len(prompts))

    def client(index: int) -> None:
        start.wait()
        results[index] = stream_events(service, {"prompt": prompts[index], "max_tokens": 12, "temperature": 0})

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert len(results) == len(prompts)
    for _index, (job_id, events) in results.items():
        done = events[-1]
        assert done.event == "done" and done.data["job_id"] == job_id
        assert "".join(e.data["text"] for e in events[:-1]) == done.data["output_text"]
    # Each stream's text is the one that prompt gets alone (greedy decoding is batch-invariant).
    for index in (0, 13, 31):
        alone = generate(service, {"prompt": prompts[index], "max_tokens": 12, "temperature": 0})
        assert alone["output_ids"] == results[index][1][-1].data["output_ids"]
    assert StartedJobRegistry("cpu", connection=service.redis).get_job_ids() == []


def test_a_greedy_stream_joining_a_running_batch_gets_the_tokens_it_gets_alone(service):
    body = {"prompt": "Explain why the sky is blue.", "max_tokens": 24, "temperature": 0}
    alone = generate(service, body)
    others: list = []
    background = [
        threading.Thread(target=lambda b=b: others.append(stream_events(service, b)))
        for b in ({"prompt": "Tell me a long story about dragons and knights in a castle.", "max_tokens": 64,
                   "temperature": 0.8, "seed": 3},
                  {"prompt": "List some fruits.", "max_tokens": 64, "temperature": 1.0, "top_k": 20, "seed": 9})
    ]
    for thread in background:
        thread.start()
    # Join mid-way: wait until the other streams are producing tokens.
    deadline = time.monotonic() + 60
    while service.redis.llen(f"llm:job:{next(iter(queued_job_ids(service)), '')}:events") < 3:
        assert time.monotonic() < deadline, "background streams never started"
        time.sleep(0.05)
    joined = generate(service, body)
    for thread in background:
        thread.join(timeout=300)
    assert joined["output_ids"] == alone["output_ids"]
    assert all(events[-1].event == "done" for _, events in others)


def queued_job_ids(service) -> list[str]:
    """Ids of jobs currently running on the CPU pool."""
    return StartedJobRegistry("cpu", connection=service.redis).get_job_ids()


def test_closing_a_stream_cancels_its_job_and_spares_the_others(service):
    long_body = {"prompt": "Write a very long essay about the history of ships.", "max_tokens": 400,
                 "temperature": 0}
    survivors: list = []
    threads = [threading.Thread(target=lambda: survivors.append(stream_events(
        service, {"prompt": "Describe a forest.", "max_tokens": 40, "temperature": 0}))) for _ in range(2)]
    response = requests.post(service.url("/stream"), json=long_body, stream=True, timeout=300)
    job_id = response.headers["X-Job-Id"]
    events = iter_events(response)
    for thread in threads:
        thread.start()
    received = [next(events) for _ in range(5)]
    response.close()  # the client goes away mid-stream
    assert all(e.event == "token" for e in received)
    assert wait_for_status(service, job_id, {JobStatus.CANCELED, JobStatus.FINISHED}) == JobStatus.CANCELED
    backlog = service.redis.lrange(f"llm:job:{job_id}:events", 0, -1)
    assert len(backlog) < 200, "the cancelled job kept generating"
    for thread in threads:
        thread.join(timeout=300)
    assert len(survivors) == 2
    for _, survivor in survivors:
        assert survivor[-1].event == "done" and survivor[-1].data["usage"]["completion_tokens"] >= 1
    assert job_id not in StartedJobRegistry("cpu", connection=service.redis).get_job_ids()


def test_delete_cancels_a_running_job(service):
    response = requests.post(service.url("/stream"), json={"prompt": "Count to one thousand.", "max_tokens": 400,
                                                           "temperature": 0}, stream=True, timeout=300)
    job_id = response.headers["X-Job-Id"]
    events = iter_events(response)
    next(events)
    deleted = requests.delete(service.url(f"/jobs/{job_id}"), timeout=10)
    assert deleted.status_code in (200, 202)
    rest = list(events)
    response.close()
    assert rest[-1].event == "error" and rest[-1].data["error"]["type"] == "cancelled"
    assert wait_for_status(service, job_id, {JobStatus.CANCELED}) == JobStatus.CANCELED


@pytest.mark.parametrize(("path", "body"), [
    ("/generate", {"prompt": "1, 2, 3, 4, 5,", "max_tokens": 500, "temperature": 0}),
    ("/v1/completions", {"prompt": "1, 2, 3, 4, 5,", "max_tokens": 500, "temperature": 0}),
])
def test_a_client_leaving_a_blocking_call_cancels_its_job(service, path, body):
    canceled = CanceledJobRegistry("cpu", connection=service.redis)
    before = set(canceled.get_job_ids())
    with pytest.raises(requests.ReadTimeout):  # the client gives up and closes its connection
        requests.post(service.url(path), json=body, timeout=(5, 1.5))
    deadline = time.monotonic() + 10
    while not (left := set(canceled.get_job_ids()) - before):
        assert time.monotonic() < deadline, "the abandoned job was not cancelled"
        time.sleep(0.1)
    (job_id,) = left
    assert len(read_backlog(service.redis, job_id)) < 300, "the abandoned job kept generating"
