"""Workers die, the fleet goes on: real gunicorn and `rq worker cpu` processes from the Procfile, on a
redis-server of the test's own (a spare port), killed with SIGKILL as an OOM killer or a lost node would.

The tests run in order on one module-wide service: two workers; the one holding a stream is killed and the
other finishes it; then the last one is killed and clients are told `no_worker`; then three workers that
each die on the same job (the CRASH_AFTER_TOKENS fault hook) make it fail after MAX_RECOVERIES.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import redis
import requests
from rq import Worker
from rq.job import Job
from rq.registry import StartedJobRegistry

from shared.events import backlog_key
from shared.lanes import LANES, queue_name
from tests.service_fixtures import Service, free_port, own_redis_server, service_environment
from tests.sse_client import iter_events

pytestmark = [pytest.mark.integration, pytest.mark.model, pytest.mark.slow]

WORKER_DEAD_S = 4
"""Short, so the test is quick; the default is 10."""

PROMPT = "1, 2, 3, 4, 5,"
"""Greedy, SmolLM2 counts on for as long as it is asked to: a stream long enough to kill a worker in."""


@pytest.fixture(scope="module")
def redis_server():
    with own_redis_server() as server:
        yield server


@pytest.fixture(scope="module")
def fleet(redis_server):
    """gunicorn and two CPU workers (eager decoding, one thread each: quick to start on two cores)."""
    port = free_port()
    env = service_environment(port, REDIS_URL=redis_server.url, WORKER_DEAD_S=str(WORKER_DEAD_S), KEEPALIVE_S="1",
                              COMPILE_DECODE="0", TORCH_THREADS="1", MAX_SEQ_LEN="512")
    running = Service(f"http://127.0.0.1:{port}", redis.Redis.from_url(redis_server.url), {}, {})
    running.env = env
    try:
        running.start("web", env)
        running.start("cpu", env, name="cpu-1")
        running.start("cpu", env, name="cpu-2")
        running.wait_for_workers("cpu", 2)
        yield running
    finally:
        running.stop_all()


def live_cpu_workers(fleet) -> int:
    return requests.get(fleet.url("/health"), timeout=5).json()["workers"]["cpu"]


def worker_pid(fleet, job_id: str) -> int:
    """The pid of the worker process running the job (RQ records the worker's name and the worker its pid)."""
    name = Job.fetch(job_id, connection=fleet.redis).worker_name
    return Worker.find_by_key(f"rq:worker:{name}", connection=fleet.redis).pid


def kill(fleet, pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    for name, process in fleet.processes.items():
        if process.pid == pid:
            process.wait(timeout=10)
            fleet.processes.pop(name)  # gone on purpose: `check_alive` must not count it as a failure
            return


def greedy(max_tokens: int) -> dict:
    return {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}


def test_a_stream_whose_worker_is_killed_finishes_on_the_other_worker(fleet):
    reference = requests.post(fleet.url("/generate"), json=greedy(80), timeout=300).json()
    with requests.post(fleet.url("/stream"), json=greedy(80), stream=True, timeout=300) as response:
        job_id = response.headers["X-Job-Id"]
        events, killed_at, next_token_after_kill = [], None, None
        for event in iter_events(response):
            events.append(event)
            if len(events) == 10:
                kill(fleet, worker_pid(fleet, job_id))
                killed_at = time.monotonic()
            elif killed_at is not None and next_token_after_kill is None:
                next_token_after_kill = time.monotonic() - killed_at
    assert [e.id for e in events] == list(range(1, len(events) + 1)), "ids must go on where they stopped"
    tokens, done = events[:-1], events[-1]
    assert done.event == "done", done.data
    assert [e.data["index"] for e in tokens] == list(range(len(tokens)))
    assert "".join(e.data["text"] for e in tokens) == done.data["output_text"] == reference["output_text"]
    assert done.data["output_ids"] == reference["output_ids"]
    assert next_token_after_kill < WORKER_DEAD_S + 10
    print(f"first token after SIGKILL came {next_token_after_kill:.1f} s later")
    assert live_cpu_workers(fleet) == 1, "the dead worker must no longer count"
    # A client that reconnects with Last-Event-ID across the failover gets the rest, once.
    with requests.get(fleet.url(f"/jobs/{job_id}/stream"), headers={"Last-Event-ID": "5"}, stream=True,
                      timeout=30) as resumed:
        assert [e.id for e in iter_events(resumed)] == [e.id for e in events[5:]]


def test_blocking_generate_and_batch_items_complete_across_a_worker_kill(fleet):
    assert live_cpu_workers(fleet) == 1
    reference = requests.post(fleet.url("/generate"), json=greedy(60), timeout=300).json()
    answers: dict = {}
    blocking = threading.Thread(target=lambda: answers.update(
        generate=requests.post(fleet.url("/generate"), json=greedy(60), timeout=300)))
    blocking.start()
    batch = requests.post(fleet.url("/generate_batch"), json={"prompts": [PROMPT, PROMPT], "max_tokens": 60,
                                                              "temperature": 0, "wait": False}, timeout=30).json()
    started = [StartedJobRegistry(queue_name("cpu", lane), connection=fleet.redis) for lane in LANES]
    deadline = time.monotonic() + 120
    while not (len(ids := [i for registry in started for i in registry.get_job_ids()]) == 3
               and all(fleet.redis.llen(backlog_key(i)) >= 5 for i in ids)):
        assert time.monotonic() < deadline, "the three jobs did not start on the one worker"
        time.sleep(0.05)
    holder = worker_pid(fleet, ids[0])
    fleet.start("cpu", fleet.env, name="cpu-3")
    fleet.wait_for_workers("cpu", 2)
    kill(fleet, holder)
    blocking.join(timeout=300)
    answer = answers["generate"]
    assert answer.status_code == 200 and answer.json()["output_ids"] == reference["output_ids"]
    deadline = time.monotonic() + 120
    while (status := requests.get(fleet.url(f"/batches/{batch['batch_id']}"), timeout=10).json())["status"] != "done":
        assert time.monotonic() < deadline, status
        time.sleep(0.2)
    assert [result["output_ids"] for result in status["results"]] == [reference["output_ids"]] * 2


def test_when_the_last_worker_dies_open_streams_end_with_no_worker(fleet):
    with requests.post(fleet.url("/stream"), json=greedy(400), stream=True, timeout=300) as response:
        job_id = response.headers["X-Job-Id"]
        events = iter_events(response)
        next(events)
        kill(fleet, worker_pid(fleet, job_id))
        killed_at = time.monotonic()
        rest = list(events)
    waited = time.monotonic() - killed_at
    assert rest[-1].event == "error" and rest[-1].data["error"]["type"] == "no_worker", rest[-1].data
    assert waited < WORKER_DEAD_S + 5 + 2, f"the client waited {waited:.1f} s"
    assert live_cpu_workers(fleet) == 0
    refused = requests.post(fleet.url("/generate"), json=greedy(4), timeout=30)
    assert refused.status_code == 503 and refused.json()["error"]["type"] == "no_worker"


def test_a_job_that_kills_every_worker_it_lands_on_fails_after_max_recoveries(fleet):
    crashing = {**fleet.env, "CRASH_AFTER_TOKENS": "5"}  # MAX_RECOVERIES stays 2, its default
    for number in range(3):
        fleet.start("cpu", crashing, name=f"crashing-{number}")
    fleet.wait_for_workers("cpu", 3)
    with requests.post(fleet.url("/stream"), json=greedy(40), stream=True, timeout=300) as response:
        events = list(iter_events(response))
    tokens, error = events[:-1], events[-1]
    assert error.event == "error" and error.data["error"]["type"] == "job_lost", error.data
    assert "MAX_RECOVERIES is 2" in error.data["error"]["message"]
    # Each worker sent tokens before dying (5 by the first; the two that resumed, their first step's), and the
    # stream carried them all, once, in order.
    assert [e.data["index"] for e in tokens] == list(range(len(tokens))) and len(tokens) >= 7
    assert [e.id for e in events] == list(range(1, len(events) + 1))
    assert live_cpu_workers(fleet) == 0
    for number in range(3):
        assert fleet.processes.pop(f"crashing-{number}").wait(timeout=10) == 137  # died on purpose


def test_sigterm_drains_then_hands_back_a_stream_longer_than_drain_s(fleet):
    env = {**fleet.env, "DRAIN_S": "2"}
    for number in range(2):
        fleet.start("cpu", env, name=f"draining-{number}")
    fleet.wait_for_workers("cpu", 2)
    reference = requests.post(fleet.url("/generate"), json=greedy(150), timeout=300).json()
    with requests.post(fleet.url("/stream"), json=greedy(150), stream=True, timeout=300) as response:
        job_id = response.headers["X-Job-Id"]
        events, exit_code, live_during_drain = [], None, None
        for event in iter_events(response):
            events.append(event)
            if len(events) == 10:
                holder = worker_pid(fleet, job_id)
                os.kill(holder, signal.SIGTERM)
                live_during_drain = live_cpu_workers(fleet)
                name = next(name for name, p in fleet.processes.items() if p.pid == holder)
                exit_code = fleet.processes.pop(name).wait(timeout=2 + 15)  # DRAIN_S, then the hand-back
    assert live_during_drain == 1, "a draining worker must stop counting at once"
    assert exit_code == 0
    assert [e.id for e in events] == list(range(1, len(events) + 1))
    assert events[-1].event == "done" and events[-1].data["output_text"] == reference["output_text"]


def test_a_second_sigterm_hands_back_at_once(fleet):
    for name in [name for name in fleet.processes if name.startswith("draining")]:  # DRAIN_S 2: not this test's
        os.kill(fleet.processes[name].pid, signal.SIGTERM)
        assert fleet.processes.pop(name).wait(timeout=30) == 0  # idle: it leaves at once
    env = {**fleet.env, "DRAIN_S": "120"}
    for number in range(2):
        fleet.start("cpu", env, name=f"patient-{number}")
    fleet.wait_for_workers("cpu", 2)
    with requests.post(fleet.url("/stream"), json=greedy(300), stream=True, timeout=300) as response:
        job_id = response.headers["X-Job-Id"]
        events, exit_code, took = [], None, None
        for event in iter_events(response):
            events.append(event)
            if len(events) == 10:
                holder = worker_pid(fleet, job_id)
                name = next(name for name, p in fleet.processes.items() if p.pid == holder)
                os.kill(holder, signal.SIGTERM)
                time.sleep(1.5)  # RQ ignores a second signal within a second of the first (a pool's echo)
                signalled_at = time.monotonic()
                os.kill(holder, signal.SIGTERM)
                exit_code = fleet.processes.pop(name).wait(timeout=30)
                took = time.monotonic() - signalled_at
    assert exit_code == 0 and took < 10, f"exit {exit_code} after {took} s, DRAIN_S is 120"
    assert [e.id for e in events] == list(range(1, len(events) + 1)) and events[-1].event == "done"


def test_after_a_redis_outage_the_fleet_serves_again_without_a_restart(fleet, redis_server):
    fleet.start("cpu", fleet.env, name="outage")
    fleet.wait_for_workers("cpu", 2)  # with the worker left from the drain test: one busy, one idle
    with requests.post(fleet.url("/stream"), json=greedy(300), stream=True, timeout=300) as response:
        events = iter_events(response)
        next(events)
        redis_server.stop()
        stopped_at = time.monotonic()
        rest = list(events)
    assert rest[-1].event == "error" and rest[-1].data["error"]["type"] == "unavailable", rest[-1].data
    outage_left_s = 10 - (time.monotonic() - stopped_at)
    time.sleep(max(0.0, outage_left_s))  # the outage itself: Redis stays down for 10 s
    assert requests.get(fleet.url("/health"), timeout=5).status_code == 503
    redis_server.start()  # empty: no persistence, as the shared test Redis runs
    back_at = time.monotonic()
    while live_cpu_workers(fleet) < 2:  # both workers register again by themselves
        assert time.monotonic() - back_at < 5 + 2, "the workers did not register again"
        time.sleep(0.1)
    answer = requests.post(fleet.url("/generate"), json=greedy(8), timeout=60)
    assert answer.status_code == 200 and answer.json()["finish_reason"] == "length"
    fleet.check_alive()  # no process was restarted, none died

