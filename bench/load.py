"""Many clients at one worker: what admission control gives a crowd (refusals, first tokens, /health, memory).

    python -m bench.load [--clients 200] [--duration 60] [--tokens 128] [--redis-url redis://localhost:6379/10]
                         [--write]

Starts the Procfile's web and cpu processes (one worker, MAX_BATCH_SIZE 32, default admission settings) on a
flushed Redis db, then `--clients` threads, released together, each sending greedy `/stream` requests of
`--tokens` tokens one after another until `--duration` has passed: a 429 is timed (request sent -> answer)
and the client waits its `Retry-After` before trying again, as a polite client would; an admitted stream
is read to its end. A poller times `GET /health` every 0.2 s meanwhile. The API's memory (gunicorn's master
and workers) is read before, at the end of the load, and 15 s after the last client stopped.

Reported: streams completed, failed and hung (no end within 180 s), 429s and their latency, the first-token
latency of admitted streams (p50/p95), `/health` latency (p50/p95/max) and API memory. Targets (issue):
admitted p95 first token <= 3 s, refusals within 50 ms, /health p95 < 100 ms, nothing hangs, memory back to
its idle level.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from dataclasses import dataclass, field

import requests

from bench.common import machine, median, percentile, write_section
from bench.service import running_service_group, tree_rss_mb, warm_up_service
from tests.sse_client import iter_events

PROMPT = "1, 2, 3, 4, 5,"
"""A raw prompt the model continues for a long while (greedy), so streams run their full length."""

STREAM_TIMEOUT_S = 180
"""A stream with no end after this long counts as hung."""


@dataclass
class Tally:
    """What the clients saw, appended to from many threads (list.append is atomic in CPython)."""

    first_tokens: list[float] = field(default_factory=list)
    refusals: list[float] = field(default_factory=list)
    retry_after: list[int] = field(default_factory=list)
    completed: list[int] = field(default_factory=list)  # tokens of each completed stream
    failed: list[str] = field(default_factory=list)
    hung: list[str] = field(default_factory=list)
    health: list[float] = field(default_factory=list)
    health_errors: list[str] = field(default_factory=list)


def client(base_url: str, tokens: int, stop_at: float, barrier: threading.Barrier, tally: Tally) -> None:
    """Send streams one after another until `stop_at`; wait Retry-After after a 429."""
    barrier.wait()
    body = {"prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "backend": "cpu"}
    while time.monotonic() < stop_at:
        sent = time.perf_counter()
        try:
            with requests.post(f"{base_url}/stream", json=body, stream=True, timeout=STREAM_TIMEOUT_S) as response:
                if response.status_code == 429:
                    tally.refusals.append(time.perf_counter() - sent)
                    wait_s = int(response.headers.get("Retry-After", "1"))
                    tally.retry_after.append(wait_s)
                    time.sleep(min(wait_s, max(0.0, stop_at - time.monotonic())))
                    continue
                if response.status_code != 200:
                    tally.failed.append(f"HTTP {response.status_code}: {response.text[:200]}")
                    continue
                received = 0
                for event in iter_events(response):
                    if event.event == "token":
                        if received == 0:
                            tally.first_tokens.append(time.perf_counter() - sent)
                        received += 1
                    elif event.event == "done":
                        tally.completed.append(received)
                        break
                    elif event.event == "error":
                        tally.failed.append(f"error event: {event.data}")
                        break
        except requests.Timeout:
            tally.hung.append("no end within the stream timeout")
        except requests.RequestException as exc:
            tally.failed.append(f"{type(exc).__name__}: {exc}")


def poll_health(base_url: str, stop: threading.Event, tally: Tally) -> None:
    while not stop.wait(0.2):
        sent = time.perf_counter()
        try:
            requests.get(f"{base_url}/health", timeout=10).raise_for_status()
            tally.health.append(time.perf_counter() - sent)
        except requests.RequestException as exc:
            tally.health_errors.append(str(exc))


def run(base_url: str, web_pid: int, clients: int, duration: float, tokens: int) -> dict:
    """Drive the load; return the figures."""
    tally, stop_health = Tally(), threading.Event()
    rss_idle = tree_rss_mb(web_pid)
    barrier = threading.Barrier(clients)
    started = time.monotonic()
    stop_at = started + duration
    threads = [threading.Thread(target=client, args=(base_url, tokens, stop_at, barrier, tally), daemon=True)
               for _ in range(clients)]
    health = threading.Thread(target=poll_health, args=(base_url, stop_health, tally), daemon=True)
    health.start()
    for thread in threads:
        thread.start()
    time.sleep(duration)
    rss_loaded = tree_rss_mb(web_pid)
    for thread in threads:
        thread.join(timeout=STREAM_TIMEOUT_S + 10)
    stop_health.set()
    health.join()
    wall = time.monotonic() - started
    time.sleep(15)
    return {"tally": tally, "wall_s": wall, "rss_idle": rss_idle, "rss_loaded": rss_loaded,
            "rss_after": tree_rss_mb(web_pid), "alive": sum(thread.is_alive() for thread in threads)}


def ms(values: list[float], q: float) -> str:
    return f"{1000 * percentile(values, q):.0f}" if values else "-"


def report(figures: dict, clients: int, duration: float, tokens: int) -> str:
    tally: Tally = figures["tally"]
    generated = sum(tally.completed)
    lines = [
        f"Machine: {machine()}; load average at the start {os.getloadavg()[0]:.1f}. `python -m bench.load "
        f"--clients {clients} --duration {duration:g} --tokens {tokens}`: one CPU worker (MAX_BATCH_SIZE 32, "
        "default admission settings), 2 gunicorn processes x 64 threads, clients released together, each "
        "sending greedy `/stream`s one after another and waiting `Retry-After` after a 429.",
        "",
        "| what | figure |",
        "|---|---|",
        f"| streams completed / failed / hung | {len(tally.completed)} / {len(tally.failed)} / "
        f"{len(tally.hung) + figures['alive']} |",
        f"| tokens received (completed streams), aggregate tokens/s | {generated}, "
        f"{generated / figures['wall_s']:.0f} |",
        f"| 429 refusals; their latency p50 / p95 / max (ms) | {len(tally.refusals)}; {ms(tally.refusals, 50)} / "
        f"{ms(tally.refusals, 95)} / {ms(tally.refusals, 100)} |",
        f"| Retry-After sent, median (s) | {median(tally.retry_after) if tally.retry_after else '-'} |",
        f"| admitted streams' first token p50 / p95 / max (ms) | {ms(tally.first_tokens, 50)} / "
        f"{ms(tally.first_tokens, 95)} / {ms(tally.first_tokens, 100)} |",
        f"| `/health` during the load p50 / p95 / max (ms), errors | {ms(tally.health, 50)} / "
        f"{ms(tally.health, 95)} / {ms(tally.health, 100)}, {len(tally.health_errors)} |",
        f"| API memory idle / at the end of the load / 15 s after (MB) | {figures['rss_idle']:.0f} / "
        f"{figures['rss_loaded']:.0f} / {figures['rss_after']:.0f} |",
    ]
    if tally.failed:
        lines += ["", f"First failure: {tally.failed[0]}"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--redis-url", default="redis://localhost:6379/10")
    parser.add_argument("--write", action="store_true", help="record the table in BENCHMARKS.md")
    args = parser.parse_args()
    with running_service_group(args.redis_url, 32, GUNICORN_THREADS="64") as (base_url, group):
        # Warm up: every gunicorn process loads its tokenizer, the worker compiles its decode step for
        # batch sizes up to 32.
        warm_up_service(base_url, PROMPT, streams=32, tokens=8)
        figures = run(base_url, group.processes["web"].pid, args.clients, args.duration, args.tokens)
    text = report(figures, args.clients, args.duration, args.tokens)
    print(text)
    if args.write:
        write_section("Load: 200 clients at one worker", text)


if __name__ == "__main__":
    main()
