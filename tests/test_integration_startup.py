"""Start-up as a person sees it, with real processes: gunicorn and `rq worker cpu` from the Procfile on the tiny
model and a redis-server of the test's own, and `bin/start` itself.

While a worker loads its model it counts as `starting`: a request for its pool waits in the queue and is served
once the worker is ready, `/health` says `starting` then `ok`, and `bin/wait-ready` says so too. A worker killed
while starting stops counting within WORKER_DEAD_S and the request it was waiting for ends with `no_worker`.
The worker's start is held open by the test (tests/startup_gate.py), so "sent while it starts" is certain.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import threading
import time

import pytest
import redis
import requests

from tests.service_fixtures import ROOT, Service, free_port, own_redis_server, procfile_commands, tiny_environment
from tests.sse_client import iter_events
from tests.startup_gate import START_GATE

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WORKER_DEAD_S = 3
"""Short, so a worker killed while starting stops counting quickly; the default is 10."""

GATED_CPU = procfile_commands()["cpu"].replace("workers.cpu.CPUWorker", "tests.startup_gate.GatedCPUWorker")
"""The Procfile's `cpu` line with the worker whose model load waits for the test's gate."""

WAIT_S = 120
"""The longest any step may take here (processes start slowly on a busy two-core machine)."""

REQUEST = {"prompt": "Hello", "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def web(tiny_weights):
    """gunicorn on the tiny model and a redis-server of its own, with no worker yet; each test starts its own."""
    with own_redis_server() as server:
        port = free_port()
        env = tiny_environment(port, server.url, tiny_weights, WORKER_DEAD_S=str(WORKER_DEAD_S), KEEPALIVE_S="1")
        running = Service(f"http://127.0.0.1:{port}", redis.Redis.from_url(server.url), {}, {})
        running.env = env
        try:
            running.start("web", env, name="startup-web")
            wait_for_health(running, lambda health: True)
            yield running
        finally:
            running.stop_all()


def wait_for_health(service: Service, condition) -> dict:
    """The first /health answer that meets `condition`."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        service.check_alive()
        try:
            health = requests.get(service.url("/health"), timeout=5).json()
            if condition(health):
                return health
        except (requests.ConnectionError, requests.Timeout):  # not listening yet
            pass
        time.sleep(0.1)
    raise TimeoutError(f"/health did not get there within {WAIT_S} s")


def start_gated_worker(service: Service, name: str) -> subprocess.Popen:
    """A CPU worker that registers, then waits for the gate before it loads its model."""
    service.redis.delete(START_GATE)
    worker = service.start("cpu", service.env, name=name, command=GATED_CPU)
    wait_for_health(service, lambda health: health["starting"]["cpu"] == 1)
    return worker


def stop(service: Service, name: str, sig: int = signal.SIGTERM) -> None:
    """Stop a worker (SIGKILL: as a crash would) and forget it, so `check_alive` does not count it as a failure."""
    process = service.processes.pop(name)
    os.kill(process.pid, sig)  # `bash -c` execs the worker, so this is its pid
    process.wait(timeout=WAIT_S)


def lines_of(process: subprocess.Popen) -> queue.Queue:
    """The process's output lines, as they come (None at its end)."""
    lines: queue.Queue = queue.Queue()

    def read() -> None:
        for line in process.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)
    threading.Thread(target=read, daemon=True).start()
    return lines


def read_until(lines: queue.Queue, prefix: str) -> list[str]:
    """Every line up to and including the first that starts with `prefix`."""
    seen = []
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        assert line is not None, f"the output ended without a {prefix!r} line: {seen}"
        seen.append(line)
        if line.startswith(prefix):
            return seen
    raise TimeoutError(f"no {prefix!r} line within {WAIT_S} s: {seen}")


def test_a_request_sent_while_the_worker_starts_waits_for_it_and_is_served(web):
    watcher = subprocess.Popen([str(ROOT / "bin" / "wait-ready"), web.base_url, "--timeout", str(WAIT_S)],
                               stdout=subprocess.PIPE, text=True)
    watched = lines_of(watcher)
    start_gated_worker(web, "gated-cpu")
    try:
        assert read_until(watched, "starting:")[-1] == ("starting: 1 cpu worker loading the model; requests sent now "
                                                        "wait in the queue until it is ready")
        assert requests.get(web.url("/health"), timeout=5).json() == {
            "status": "starting", "redis": True, "workers": {"gpu": 0, "cpu": 0}, "starting": {"gpu": 0, "cpu": 1}}
        with requests.post(web.url("/stream"), json=REQUEST, stream=True, timeout=WAIT_S) as response:
            assert response.status_code == 200  # not a 503: the starting worker counts
            job_id = response.headers["X-Job-Id"]
            assert requests.get(web.url(f"/jobs/{job_id}"), timeout=5).json()["status"] == "queued"
            web.redis.set(START_GATE, "1")  # the model loads now
            events = list(iter_events(response))
        assert events[-1].event == "done" and events[-1].data["job_id"] == job_id
        assert [e.event for e in events[:-1]] == ["token"] * events[-1].data["usage"]["completion_tokens"]
        assert requests.get(web.url("/health"), timeout=5).json() == {
            "status": "ok", "redis": True, "workers": {"gpu": 0, "cpu": 1}, "starting": {"gpu": 0, "cpu": 0}}
        ready = read_until(watched, "ready:")[-1]
        assert re.fullmatch(r"ready: 1 cpu worker after \d+ s; try: curl -s \S+/generate .*", ready), ready
        assert watcher.wait(timeout=10) == 0
    finally:
        watcher.kill()
        stop(web, "gated-cpu")
    assert requests.get(web.url("/health"), timeout=5).json()["workers"]["cpu"] == 0  # a drained worker leaves


def test_a_worker_killed_while_starting_stops_counting_and_its_request_ends_with_no_worker(web):
    start_gated_worker(web, "doomed-cpu")
    with requests.post(web.url("/stream"), json=REQUEST, stream=True, timeout=WAIT_S) as response:
        assert response.status_code == 200
        stop(web, "doomed-cpu", signal.SIGKILL)  # dies while loading: nothing cleaned up
        killed_at = time.monotonic()
        events = list(iter_events(response))
        ended_after_s = time.monotonic() - killed_at
    assert [e.event for e in events] == ["error"] and events[0].data["error"]["type"] == "no_worker"
    assert ended_after_s < WORKER_DEAD_S + 5  # its key expired, then the stream's next liveness check
    print(f"the waiting stream ended {ended_after_s:.1f} s after the starting worker was killed")
    assert requests.get(web.url("/health"), timeout=5).json()["starting"]["cpu"] == 0


@pytest.fixture
def started(tiny_weights):
    """`bin/start` (honcho: gunicorn and one CPU worker, and the readiness watcher) on the tiny model and a
    redis-server of its own; its output lines, as they come. Stopped with SIGTERM, as Ctrl-C's honcho would be."""
    with own_redis_server() as server:
        env = tiny_environment(free_port(), server.url, tiny_weights)
        process = subprocess.Popen([str(ROOT / "bin" / "start")], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            yield lines_of(process)
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)  # honcho stops gunicorn and the worker, then exits


def test_bin_start_says_when_the_service_is_ready_and_how_to_try_it(started):
    lines = read_until(started, "ready:")
    match = re.fullmatch(r"ready: 1 cpu worker after (\d+) s; try: (curl .*)", lines[-1])
    assert match, lines[-1]
    print(f"bin/start on the tiny model: {lines[-1]}")
    tried = subprocess.run(match[2], shell=True, capture_output=True, text=True, timeout=WAIT_S)
    assert tried.returncode == 0 and tried.stdout, (tried.returncode, tried.stderr, lines)
    answer = json.loads(tried.stdout)
    assert answer["finish_reason"] in ("length", "eos") and answer["usage"]["completion_tokens"] >= 1
