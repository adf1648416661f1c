"""How long streams wait when their worker is killed: SIGKILL to each stream's next token on another worker.

`python -m bench.failover [--streams 1 8] [--repeats 5] [--write]`: gunicorn and CPU workers from the
Procfile on a flushed Redis db. Each repeat starts N greedy streams while one worker runs (so all N are on
it), starts a second worker, SIGKILLs the first once the second is registered, and times each stream's
wait for its next token. The ids must go on without a gap; the streams are then closed (which cancels
their jobs), and the surviving worker runs the next repeat. Workers decode eagerly (COMPILE_DECODE=0) so
the many starts stay short; the wait is detection (WORKER_DEAD_S) plus requeue plus prefill.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
import time

import redis
import requests

from bench.common import machine, median, write_section
from bench.service import ProcessGroup, free_port, procfile_commands, service_environment
from shared.settings import Settings
from tests.sse_client import iter_events

PROMPT = "1, 2, 3, 4, 5,"
"""Greedy, the model counts on for as long as it is asked to."""


class Stream(threading.Thread):
    """One greedy /stream, its events and their arrival times, read until `close()`."""

    def __init__(self, base_url: str, max_tokens: int):
        super().__init__(daemon=True)
        self.base_url, self.max_tokens = base_url, max_tokens
        self.events: list[tuple[float, object]] = []
        self.closing = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        body = {"prompt": PROMPT, "max_tokens": self.max_tokens, "temperature": 0}
        try:
            with requests.post(f"{self.base_url}/stream", json=body, stream=True, timeout=600) as response:
                response.raise_for_status()
                for event in iter_events(response):
                    self.events.append((time.monotonic(), event))
                    if self.closing.is_set():
                        return  # leaving cancels the job
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            self.error = exc

    def count(self) -> int:
        if self.error is not None:
            raise self.error
        return len(self.events)

    def wait_after(self, instant: float) -> float | None:
        """Seconds from `instant` to the first event after it (None: none yet)."""
        return next((at - instant for at, _ in self.events if at > instant), None)

    def close(self) -> None:
        self.closing.set()
        self.join(timeout=60)
        ids = [event.id for _, event in self.events]
        assert ids == list(range(1, len(ids) + 1)), "event ids must go on without a gap"


def wait_until(ready, what: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.02)


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


def one_repeat(fleet: Fleet, streams: int) -> list[float]:
    """With one worker running `streams` streams, start another, kill the first; each stream's wait."""
    wait_until(lambda: fleet.live() == 1, "the last repeat's killed worker to drop out")
    running = [Stream(fleet.base_url, max_tokens=900) for _ in range(streams)]  # far more than a repeat reads
    for stream in running:
        stream.start()
    wait_until(lambda: all(s.count() >= 5 for s in running), "the streams' first tokens")
    (holder,) = fleet.pids()
    fleet.add_worker()
    fleet.wait_for(2)
    os.kill(holder, signal.SIGKILL)
    killed_at = time.monotonic()
    fleet.forget(holder)
    wait_until(lambda: all(s.wait_after(killed_at) is not None for s in running) or any(s.error for s in running),
               "the streams' first tokens after the kill")
    waits = [s.wait_after(killed_at) for s in running]
    for stream in running:
        stream.close()
    return waits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--redis-url", default="redis://localhost:6379/12", help="a Redis db to flush and use")
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = parser.parse_args()
    fleet = Fleet(args.redis_url)
    rows = []
    try:
        fleet.add_worker()
        fleet.wait_for(1)
        for streams in args.streams:
            waits = [one_repeat(fleet, streams) for _ in range(args.repeats)]
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
                      f"Machine: {machine()}. `python -m bench.failover --repeats {args.repeats}`: WORKER_DEAD_S "
                      f"{dead_s}; CPU workers decode eagerly on one thread each; every stream's event ids went on "
                      f"without a gap.\n\n{table}")


if __name__ == "__main__":
    main()
