"""How long streams wait when their worker is killed: SIGKILL to each stream's next token on the other worker.

`python -m bench.failover [--streams 1 8] [--repeats 5] [--write]`: gunicorn and two CPU workers from the
Procfile on a flushed Redis db. Each repeat holds the spare worker (SIGSTOP, for well under WORKER_DEAD_S)
while N greedy streams start, so all N run on the other; once each has a few tokens that worker is
SIGKILLed, and each stream's wait for its next token is timed. The streams must then finish with `done`
and contiguous ids; a fresh worker replaces the killed one before the next repeat. Workers decode eagerly
(COMPILE_DECODE=0) so the many restarts stay short; the wait is detection plus requeue plus prefill.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
import time

import redis
import requests
from rq import Worker

from bench.common import machine, median, write_section
from bench.service import ProcessGroup, free_port, procfile_commands, service_environment
from shared.settings import Settings
from tests.sse_client import iter_events

PROMPT = "1, 2, 3, 4, 5,"
"""Greedy, the model counts on for as long as it is asked to."""


class Stream(threading.Thread):
    """One greedy /stream, its events and their arrival times."""

    def __init__(self, base_url: str, max_tokens: int):
        super().__init__(daemon=True)
        self.base_url, self.max_tokens = base_url, max_tokens
        self.events: list[tuple[float, object]] = []
        self.job_id: str | None = None

    def run(self) -> None:
        body = {"prompt": PROMPT, "max_tokens": self.max_tokens, "temperature": 0}
        with requests.post(f"{self.base_url}/stream", json=body, stream=True, timeout=600) as response:
            self.job_id = response.headers["X-Job-Id"]
            for event in iter_events(response):
                self.events.append((time.monotonic(), event))

    def wait_after(self, instant: float) -> float:
        """Seconds from `instant` to the first event after it."""
        return next(at for at, _ in self.events if at > instant) - instant

    def check(self) -> None:
        events = [event for _, event in self.events]
        assert events[-1].event == "done", events[-1].data
        assert [e.id for e in events] == list(range(1, len(events) + 1))


class Fleet:
    """The web process and the CPU workers, by name."""

    def __init__(self, redis_url: str):
        self.connection = redis.Redis.from_url(redis_url)
        self.connection.flushdb()
        port = free_port()
        self.env = {**service_environment(redis_url, 32, port), "COMPILE_DECODE": "0", "TORCH_THREADS": "1"}
        self.base_url = f"http://127.0.0.1:{port}"
        self.group = ProcessGroup("failover")
        self.commands = procfile_commands()
        self.started = 0
        self.group.start("web", ["bash", "-c", self.commands["web"]], self.env)

    def add_worker(self) -> None:
        self.started += 1
        self.group.start(f"cpu-{self.started}", ["bash", "-c", self.commands["cpu"]], self.env)

    def live(self) -> int:
        return requests.get(f"{self.base_url}/health", timeout=5).json()["workers"]["cpu"]

    def wait_for(self, count: int) -> None:
        self.group.wait_until(lambda: self.live() >= count, f"{count} cpu workers")

    def pids(self) -> list[int]:
        return [p.pid for p in self.group.processes.values() if p.poll() is None and p.args[-1] == self.commands["cpu"]]

    def forget(self, pid: int) -> None:
        """Stop tracking a worker killed on purpose (its exit is no failure)."""
        name = next(name for name, process in self.group.processes.items() if process.pid == pid)
        self.group.processes.pop(name).wait(timeout=30)

    def holder(self, job_id: str) -> int:
        name = self.connection.hget(f"rq:job:{job_id}", "worker_name").decode()
        return Worker.find_by_key(f"rq:worker:{name}", connection=self.connection).pid


def one_repeat(fleet: Fleet, streams: int, max_tokens: int) -> list[float]:
    """Kill the worker running `streams` streams; each stream's wait for its next token."""
    spare = None
    running = [Stream(fleet.base_url, max_tokens) for _ in range(streams)]
    first = running[0]
    first.start()
    while first.job_id is None or not fleet.connection.hget(f"rq:job:{first.job_id}", "worker_name"):
        time.sleep(0.01)
    holder = fleet.holder(first.job_id)
    spare = next(pid for pid in fleet.pids() if pid != holder)
    os.kill(spare, signal.SIGSTOP)  # the others land on the holder too
    try:
        for stream in running[1:]:
            stream.start()
        while any(len(s.events) < 5 for s in running):
            time.sleep(0.01)
    finally:
        os.kill(spare, signal.SIGCONT)
    assert all(fleet.holder(s.job_id) == holder for s in running)
    os.kill(holder, signal.SIGKILL)
    killed_at = time.monotonic()
    fleet.forget(holder)
    for stream in running:
        stream.join(timeout=300)
        stream.check()
    fleet.add_worker()
    fleet.wait_for(2)
    return [stream.wait_after(killed_at) for stream in running]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=200, help="max_tokens of each stream")
    parser.add_argument("--redis-url", default="redis://localhost:6379/12", help="a Redis db to flush and use")
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = parser.parse_args()
    fleet = Fleet(args.redis_url)
    rows = []
    try:
        fleet.add_worker()
        fleet.add_worker()
        fleet.wait_for(2)
        for streams in args.streams:
            waits = [one_repeat(fleet, streams, args.tokens) for _ in range(args.repeats)]
            per_repeat = [median(w) for w in waits]
            rows.append(f"| {streams} | {median(per_repeat):.1f} | {min(per_repeat):.1f}-{max(per_repeat):.1f} | "
                        f"{max(max(w) for w in waits):.1f} |")
            print(rows[-1], flush=True)
    finally:
        fleet.group.stop()
        fleet.connection.flushdb()
    dead_s = Settings.from_env(fleet.env).worker_dead_s
    table = ("| streams on the killed worker | SIGKILL to next token, median of repeats (s) | range of the "
             "repeats' medians (s) | longest single wait (s) |\n|---|---|---|---|\n" + "\n".join(rows))
    print(table)
    if args.write:
        write_section("Failover (SIGKILL of the worker holding the streams)",
                      f"Machine: {machine()}. `python -m bench.failover --repeats {args.repeats} --tokens "
                      f"{args.tokens}`: WORKER_DEAD_S {dead_s}, two CPU workers (eager decode, one thread each); "
                      f"every stream finished with `done` and contiguous ids.\n\n{table}")


if __name__ == "__main__":
    main()
