"""Scale-out with real processes: two API processes (two ports) and two CPU workers on one Redis.

Sixteen concurrent streams spread over both APIs all complete with the greedy reference text, and both
workers take part (each runs at most 8 jobs at once); `rq info` and rq-dashboard show the pool's queue,
both workers and the running jobs meanwhile; a stream whose API process stops is resumed through the
other API with Last-Event-ID, nothing lost or repeated.
"""

from __future__ import annotations

import signal
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
import requests
from rq import Worker
from rq.job import Job

from tests.service_fixtures import ROOT, Service, free_port, own_redis_server, service_environment
from tests.sse_client import iter_events

pytestmark = [pytest.mark.integration, pytest.mark.model, pytest.mark.slow]

STREAMS = 16
PROMPTS = ["1, 2, 3, 4, 5,", "11, 12, 13, 14, 15,"]
"""Greedy continuations long enough to watch the fleet while they run, with no near-tie (the model counts on), so a
single stream's text is an oracle for every batch: "The days of the week are Monday," flipped between runs as the
prompts were grouped differently."""

MAX_TOKENS = 48


@pytest.fixture(scope="module")
def redis_url():
    """A redis-server of the fleet's own: the session's worker on the shared test database would take jobs too."""
    with own_redis_server() as server:
        yield server.url


@pytest.fixture(scope="module")
def fleet(redis_url):
    """Two gunicorns and two CPU workers (eager decoding, one thread each, 8 jobs each at most)."""
    connection = redis.Redis.from_url(redis_url)
    connection.flushdb()
    ports = [free_port(), free_port()]
    apis = [Service(f"http://127.0.0.1:{port}", connection, {}, {}) for port in ports]
    workers = apis[0]  # the workers' processes are kept (and stopped) with the first API's
    # INT8_RESIDUAL: greedy output then stays with fp32's whatever the batch, so a single stream's text is the oracle
    # (one-pass INT8 can flip a near-tie when the prompts are prefilled in other groups).
    env = {port: service_environment(port, REDIS_URL=redis_url, WEB_CONCURRENCY="1", GUNICORN_THREADS="32",
                                     COMPILE_DECODE="0", INT8_RESIDUAL="1", TORCH_THREADS="1", MAX_SEQ_LEN="512",
                                     MAX_BATCH_SIZE="8")
           for port in ports}
    try:
        for port, api in zip(ports, apis):
            api.start("web", env[port], name=f"web-{port}")
        workers.start("cpu", env[ports[0]], name="cpu-1")
        workers.start("cpu", env[ports[0]], name="cpu-2")
        for api in apis:
            api.wait_for_workers("cpu", 2)
        yield apis
    finally:
        for api in apis:
            api.stop_all()
        connection.flushdb()


@pytest.fixture(scope="module")
def references(fleet):
    """Each prompt's greedy text, from a blocking /generate."""
    return {prompt: requests.post(fleet[0].url("/generate"), timeout=300, json=greedy(prompt)).json()["output_text"]
            for prompt in PROMPTS}


def greedy(prompt: str, max_tokens: int = MAX_TOKENS) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}


class Stream:
    """One client's stream, read on a thread: its job id, its events, and a signal at its first token."""

    def __init__(self, url: str, body: dict):
        self.response = requests.post(url, json=body, stream=True, timeout=300)
        self.job_id = self.response.headers["X-Job-Id"]
        self.events = []
        self.first_token = threading.Event()

    def read(self) -> Stream:
        with self.response:
            for event in iter_events(self.response):
                self.events.append(event)
                self.first_token.set()
        self.first_token.set()
        return self


def rq_info(redis_url: str) -> str:
    """What an operator sees with `rq info` on the fleet's Redis."""
    rq = ROOT / ".venv" / "bin" / "rq"
    return subprocess.run([str(rq), "info", "--url", redis_url], capture_output=True, text=True, timeout=60,
                          check=True).stdout


def dashboard_pages(monkeypatch, redis_url: str, job_ids: list[str]) -> dict[str, dict]:
    """rq-dashboard's data pages on the fleet's Redis, as `deploy/dashboard.py` serves them."""
    pytest.importorskip("rq_dashboard")
    from deploy.dashboard import create_app

    monkeypatch.setenv("RQ_DASHBOARD_REDIS_URL", redis_url)
    client = create_app().test_client()
    pages = {"workers": "/rq-dashboard/0/data/workers.json", "queues": "/rq-dashboard/0/data/queues.json",
             "started": "/rq-dashboard/0/data/jobs/cpu/started/50/asc/1.json",
             "job": f"/rq-dashboard/0/data/job/{job_ids[0]}.json"}
    answers = {name: client.get(path) for name, path in pages.items()}
    assert {name: answer.status_code for name, answer in answers.items()} == dict.fromkeys(pages, 200)
    return {name: answer.get_json() for name, answer in answers.items()}


def test_sixteen_streams_over_two_apis_complete_on_both_workers(fleet, redis_url, references, monkeypatch):
    bodies = [greedy(PROMPTS[number % len(PROMPTS)]) for number in range(STREAMS)]
    streams = [Stream(fleet[number % 2].url("/stream"), body) for number, body in enumerate(bodies)]
    with ThreadPoolExecutor(STREAMS) as pool:
        done = [pool.submit(stream.read) for stream in streams]
        for stream in streams:
            assert stream.first_token.wait(300)
        info = rq_info(redis_url)  # while the jobs run
        pages = dashboard_pages(monkeypatch, redis_url, [stream.job_id for stream in streams])
        for future in done:
            future.result(timeout=600)

    for stream, body in zip(streams, bodies):
        events = stream.events
        assert [event.id for event in events] == list(range(1, len(events) + 1))
        assert [event.event for event in events] == ["token"] * (len(events) - 1) + ["done"]
        assert "".join(event.data["text"] for event in events[:-1]) == events[-1].data["output_text"]
        assert events[-1].data["output_text"] == references[body["prompt"]]
    ran_on = {Job.fetch(stream.job_id, connection=fleet[0].redis).worker_name for stream in streams}
    workers = {worker.name for worker in Worker.all(connection=fleet[0].redis)}
    assert len(ran_on) == 2 and ran_on == workers  # both workers did work

    busy = [line for line in info.splitlines() if "busy" in line]
    assert all(any(name in line for line in busy) for name in workers), info  # each running its share
    assert "cpu" in info
    assert {worker["name"] for worker in pages["workers"]["workers"]} == workers
    assert all(worker["queues"] == ["cpu", "cpu:side", "cpu:batch"] for worker in pages["workers"]["workers"])
    assert "cpu" in {queue["name"] for queue in pages["queues"]["queues"]}
    listed = {job["id"] for job in pages["started"]["jobs"]}
    assert listed and listed <= {stream.job_id for stream in streams}
    assert pages["job"]["origin"] == "cpu" and pages["job"]["description"].startswith("generate")


def test_a_stream_whose_api_stops_resumes_through_the_other(fleet, references):
    first, second = fleet
    prompt = PROMPTS[0]
    stream = Stream(first.url("/stream"), greedy(prompt))
    seen = []
    with stream.response:
        for event in iter_events(stream.response):
            seen.append(event)
            if len(seen) == 5:
                web = next(process for name, process in first.processes.items() if name.startswith("web"))
                web.send_signal(signal.SIGTERM)  # a redeploy of the first API
    assert [event.event for event in seen[:5]] == ["token"] * 5
    assert seen[-1].event == "error" and seen[-1].id is None and seen[-1].data["error"]["type"] == "unavailable"
    tokens = [event for event in seen if event.event == "token"]
    last_id = tokens[-1].id

    with requests.get(second.url(f"/jobs/{stream.job_id}/stream"), headers={"Last-Event-ID": str(last_id)},
                      stream=True, timeout=300) as response:
        rest = list(iter_events(response))
    assert [event.id for event in tokens + rest] == list(range(1, len(tokens) + len(rest) + 1))
    assert rest[-1].event == "done"
    text = "".join(event.data["text"] for event in tokens + rest[:-1])
    assert text == rest[-1].data["output_text"] == references[prompt]
