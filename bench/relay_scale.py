"""What 200 open streams cost the API: Redis connections, API memory, and delivering their tokens.

`python -m bench.relay_scale [--streams 200] [--before DIR] [--write]`: gunicorn (the Procfile's `web`,
WEB_CONCURRENCY=2, enough threads for every stream) on a redis-server of its own, with a registered worker
that takes nothing, so the streams' jobs stay queued while the benchmark plays the worker. It opens the
streams, counts Redis's client connections (CLIENT LIST, the benchmark's own left out) and sums the RSS of
the gunicorn processes, then publishes 20 token events and a `done` to every job, as a batching worker's
steps would, and times their delivery. `--before DIR` measures a checkout of the old code the same way
first (`git archive <commit> | tar -x -C DIR`; it runs with this checkout's .venv and weights).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import threading
import time
from pathlib import Path

import redis
import requests
from rq import Queue, Worker

from bench.common import machine, write_section
from bench.service import ROOT, ProcessGroup, free_port, procfile_commands
from shared.events import EventPublisher, publish_many
from shared.protocol import DoneEvent, TokenEvent, Usage
from tests.sse_client import iter_events

TOKENS = 20
STEP_S = 0.02
"""A batching worker's step: every running job gets a token this often."""


class Stream(threading.Thread):
    """One /stream held open: its job id once the headers came, the number of events read."""

    def __init__(self, base_url: str):
        super().__init__(daemon=True)
        self.base_url = base_url
        self.job_id: str | None = None
        self.opened = threading.Event()
        self.events = 0
        self.ended_at: float | None = None
        self.refused: str | None = None
        self.last: str | None = None

    def run(self) -> None:
        body = {"prompt": "Hello", "max_tokens": TOKENS}
        with requests.post(f"{self.base_url}/stream", json=body, stream=True, timeout=600) as response:
            if not response.ok:
                self.refused = f"{response.status_code} {response.json()['error']['type']}"
                self.opened.set()
                return
            self.job_id = response.headers["X-Job-Id"]
            self.opened.set()
            for event in iter_events(response):
                self.events += 1
                self.last = event.event
                if event.event in ("done", "error"):
                    break
        self.ended_at = time.monotonic()


def answers(connection: redis.Redis) -> bool:
    try:
        return connection.ping()
    except redis.ConnectionError:
        return False


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children, in MB (from /proc)."""
    pids = [pid, *map(int, subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split())]
    total_kb = 0
    for each in pids:
        for line in Path(f"/proc/{each}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total_kb += int(line.split()[1])
    return total_kb / 1024


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its children so far."""
    pids = [pid, *map(int, subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split())]
    ticks = 0
    for each in pids:
        fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / 100


def redis_clients(connection: redis.Redis) -> tuple[int, int]:
    """(connections, of which subscribed to pub/sub), the benchmark's own left out."""
    clients = [client for client in connection.client_list() if client["name"] != "bench"]
    return len(clients), sum(int(client["sub"]) > 0 for client in clients)


def measure(root: Path, streams: int) -> dict:
    """Open `streams` streams on the API of checkout `root`; its connections, memory and delivery."""
    port, redis_port = free_port(), free_port()
    group = ProcessGroup("relay")
    group.start("redis", ["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no"], {})
    url = f"redis://127.0.0.1:{redis_port}/0"
    connection = redis.Redis.from_url(url, client_name="bench")
    group.wait_until(lambda: answers(connection), "redis")
    Worker([Queue("cpu", connection=connection)], connection=connection).register_birth()
    env = {"PATH": f"{ROOT / '.venv' / 'bin'}:/usr/bin:/bin", "PORT": str(port), "REDIS_URL": url,
           "MODEL_DIR": str(ROOT / "weights"), "BACKEND_MODE": "cpu", "WEB_CONCURRENCY": "2",
           "GUNICORN_THREADS": str(streams)}  # gunicorn spreads connections unevenly
    group.start("web", ["bash", "-c", procfile_commands()["web"]], env, cwd=root)
    base_url = f"http://127.0.0.1:{port}"
    try:
        group.wait_until(lambda: requests.get(f"{base_url}/health", timeout=2).ok, "the API")
        web = group.processes["web"].pid
        idle_clients = redis_clients(connection)[0]
        idle_rss = rss_mb(web)
        running = [Stream(base_url) for _ in range(streams)]
        for stream in running:
            stream.start()
        for stream in running:
            assert stream.opened.wait(120), "a stream did not open"
        refused = sorted({stream.refused for stream in running if stream.refused})
        running = [stream for stream in running if not stream.refused]
        time.sleep(3)  # the streams' first liveness checks have run
        clients, pubsub = redis_clients(connection)
        open_rss = rss_mb(web)
        cpu_before = cpu_seconds(web)
        started = time.monotonic()
        publishers = [EventPublisher(connection, stream.job_id, ttl_s=600) for stream in running]
        for index in range(TOKENS):
            publish_many(connection, [(p, TokenEvent(token=1, text="a", index=index)) for p in publishers])
            time.sleep(STEP_S)
        publish_many(connection, [(p, DoneEvent(job_id=p.job_id, output_text="a" * TOKENS, output_ids=[1] * TOKENS,
                                                finish_reason="length",
                                                usage=Usage(prompt_tokens=1, completion_tokens=TOKENS)))
                                  for p in publishers])
        for stream in running:
            stream.join(timeout=120)
        delivered = sum(stream.events for stream in running)
        last = max(stream.ended_at for stream in running) - started
        return {"opened": len(running), "refused": ", ".join(refused) or "none",
                "done": sum(stream.last == "done" for stream in running),
                "idle_clients": idle_clients, "clients": clients, "pubsub": pubsub, "idle_rss": idle_rss,
                "rss": open_rss, "delivered": delivered, "expected": streams * (TOKENS + 1),
                "last_done_s": last, "publish_s": TOKENS * STEP_S, "cpu_s": cpu_seconds(web) - cpu_before}
    finally:
        group.stop()


def commit(root: Path) -> str:
    if (root / ".git").exists():
        return subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
    return root.name


def table(rows: dict[str, dict]) -> str:
    lines = ["| code | streams opened (refused with), ended with `done` | "
             "Redis connections idle / with streams (pub/sub) | "
             "API RSS idle / with streams (MB) | "
             "events delivered | last `done` after the first token (s) | API CPU for delivery (s) |",
             "|---|---|---|---|---|---|---|"]
    for label, r in rows.items():
        lines.append(f"| {label} | {r['opened']} ({r['refused']}), {r['done']} | {r['idle_clients']} / {r['clients']} "
                     f"({r['pubsub']}) | {r['idle_rss']:.0f} / "
                     f"{r['rss']:.0f} | {r['delivered']} of {r['expected']} | {r['last_done_s']:.2f} "
                     f"(publishing takes {r['publish_s']:.2f}) | {r['cpu_s']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--before", type=Path, help="a checkout of the code to compare with")
    parser.add_argument("--write", action="store_true", help="write the section of BENCHMARKS.md")
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not installed")
    rows = {}
    if args.before:
        rows[f"before ({commit(args.before)}): a pub/sub connection per stream"] = measure(args.before, args.streams)
    rows["after: one pub/sub connection per API process"] = measure(ROOT, args.streams)
    text = table(rows)
    print(text)
    if args.write:
        write_section("Relay: 200 open streams", f"""`python -m bench.relay_scale --before DIR --write` on {machine()}.
{args.streams} open `/stream`s on one gunicorn (2 processes x {args.streams} threads: gunicorn does not spread
connections evenly over its processes) whose jobs stay queued; then {TOKENS} token events and a `done`
published to every job, one step every {STEP_S * 1000:.0f} ms as a batching worker would. Connections are
Redis's CLIENT LIST (the benchmark's own left out); RSS is gunicorn's master and workers together.

{text}
""")


if __name__ == "__main__":
    main()
