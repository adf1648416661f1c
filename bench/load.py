"""Many clients at one worker: what admission control gives a crowd (refusals, first tokens, /health, memory).

    python -m bench.load [--clients 200] [--duration 60] [--tokens 128] [--rounds 2]
                         [--redis-url redis://localhost:6379/10] [--write]

Starts the Procfile's web and cpu processes (one worker, MAX_BATCH_SIZE 32, default admission settings) on a
flushed Redis db, then `--clients` clients, released together, each sending greedy `/stream` requests of
`--tokens` tokens one after another until `--duration` has passed: a 429 is timed (request sent -> answer)
and the client waits its `Retry-After-Ms` (else `Retry-After`) before trying again, as OpenAI's client does;
an admitted stream is read to its end. A poller times `GET /health` every 0.2 s meanwhile. The clients are one
asyncio loop over raw sockets, not a thread each, so that the driver's own scheduling stays out of the latencies it
reports; the refusals' time inside the API (its access log) is reported beside the clients' view.

The load runs `--rounds` times, 15 s apart. The API's memory (gunicorn's master and workers) is read before
the first round and 15 s after each: gthread keeps every thread it started (GUNICORN_THREADS per process),
so the first crowd raises the floor once; a leak would raise it again with every round.

Reported: streams completed, failed and hung (no end within 180 s), 429s and their latency, the first-token
latency of admitted streams (p50/p95), `/health` latency (p50/p95/max) and API memory. Targets (issue):
admitted p95 first token <= 3 s, refusals within 50 ms, /health p95 < 100 ms, nothing hangs, memory back to
its idle level.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from bench.common import machine, median, percentile, write_section
from bench.service import running_service_group, tree_rss_mb, warm_up_service

PROMPT = "1, 2, 3, 4, 5,"
"""A raw prompt the model continues for a long while (greedy), so streams run their full length."""

STREAM_TIMEOUT_S = 180
"""A stream with no end after this long counts as hung."""

SETTLE_S = 15
"""How long after a round the API's memory is read again."""

REFUSAL_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*POST /stream 429 (\d+\.\d+)s", re.MULTILINE)
"""A refused stream in the API's access log: when it was logged (its end), and its time inside the API."""

OPENING_S = 1.0
"""Refusals of requests sent within this long of a round's start are reported apart too: the clients' first
requests all arrive in the same millisecond, a crowd no real traffic sends at once."""


@dataclass
class Tally:
    """What the clients saw."""

    first_tokens: list[float] = field(default_factory=list)
    refusals: list[float] = field(default_factory=list)
    opening_refusals: list[float] = field(default_factory=list)  # of requests sent within OPENING_S of the start
    retry_after: list[float] = field(default_factory=list)
    completed: list[int] = field(default_factory=list)  # tokens of each completed stream
    failed: list[str] = field(default_factory=list)
    hung: list[str] = field(default_factory=list)
    health: list[float] = field(default_factory=list)
    health_errors: list[str] = field(default_factory=list)
    loop_lag: list[float] = field(default_factory=list)  # the driver's own delays (`watch_loop`)


class Address:
    """Host and port of the service, and the raw HTTP/1.0 requests sent to it (the answer ends when the
    connection closes, so a stream needs no chunked decoding)."""

    def __init__(self, base_url: str, tokens: int):
        parts = urlsplit(base_url)
        self.host, self.port = parts.hostname, parts.port
        body = json.dumps({"prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "backend": "cpu"}).encode()
        self.stream_request = (f"POST /stream HTTP/1.0\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        self.health_request = f"GET /health HTTP/1.0\r\nHost: {self.host}\r\n\r\n".encode()

    async def send(self, request: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int, dict[str, str]]:
        """Send a request; the open connection, the answer's status and headers."""
        reader, writer = await asyncio.open_connection(self.host, self.port)
        writer.write(request)
        status = int((await reader.readline()).split()[1])
        headers = {}
        while (line := (await reader.readline()).decode().strip()):
            name, _, value = line.partition(":")
            headers[name.lower()] = value.strip()
        return reader, writer, status, headers


async def read_stream(reader: asyncio.StreamReader, sent: float, tally: Tally) -> None:
    """Read an admitted stream's SSE events to its end, timing its first token."""
    received, event = 0, None
    while line := await reader.readline():
        text = line.decode().rstrip("\r\n")
        if text.startswith("event:"):
            event = text[6:].strip()
        elif text.startswith("data:") and event == "token":
            if received == 0:
                tally.first_tokens.append(time.perf_counter() - sent)
            received += 1
        elif text.startswith("data:") and event in ("done", "error"):
            if event == "done":
                tally.completed.append(received)
            else:
                tally.failed.append(f"error event: {text[5:200]}")
            return
    tally.failed.append("the stream closed without a done event")


async def client(address: Address, started: float, stop_at: float, tally: Tally) -> None:
    """Send streams one after another until `stop_at`; wait Retry-After(-Ms) after a 429."""
    while time.monotonic() < stop_at:
        opening = time.monotonic() - started < OPENING_S
        sent = time.perf_counter()
        writer = None
        try:
            reader, writer, status, headers = await address.send(address.stream_request)
            if status == 429:
                await reader.read()  # the error body, to the server's close: as an HTTP client reads it
                (tally.opening_refusals if opening else tally.refusals).append(time.perf_counter() - sent)
                writer.close()  # before waiting, as a client done with the connection does
                # As OpenAI's client does: Retry-After-Ms first (whole seconds would keep a crowd in step)
                wait_s = (int(headers["retry-after-ms"]) / 1000 if "retry-after-ms" in headers
                          else int(headers.get("retry-after", "1")))
                tally.retry_after.append(wait_s)
                await asyncio.sleep(min(wait_s, max(0.0, stop_at - time.monotonic())))
            elif status != 200:
                tally.failed.append(f"HTTP {status}: {(await reader.read(200)).decode(errors='replace')}")
            else:
                await asyncio.wait_for(read_stream(reader, sent, tally), STREAM_TIMEOUT_S)
        except TimeoutError:
            tally.hung.append("no end within the stream timeout")
        except OSError as exc:
            tally.failed.append(f"{type(exc).__name__}: {exc}")
        finally:
            if writer is not None:
                writer.close()


async def poll_health(address: Address, stop: asyncio.Event, tally: Tally) -> None:
    """Time GET /health every 0.2 s until `stop`."""
    while not stop.is_set():
        sent = time.perf_counter()
        try:
            reader, writer, status, _ = await asyncio.wait_for(address.send(address.health_request), 10)
            await reader.read()
            writer.close()
            if status == 200:
                tally.health.append(time.perf_counter() - sent)
            else:
                tally.health_errors.append(f"HTTP {status}")
        except (OSError, TimeoutError) as exc:
            tally.health_errors.append(repr(exc))
        try:
            await asyncio.wait_for(stop.wait(), 0.2)
        except TimeoutError:
            pass


async def watch_loop(stop: asyncio.Event, tally: Tally) -> None:
    """How late the driver's event loop wakes from a 10 ms sleep: a busy or starved driver would delay every
    latency it reports by as much."""
    while not stop.is_set():
        asked = time.perf_counter()
        await asyncio.sleep(0.01)
        tally.loop_lag.append(time.perf_counter() - asked - 0.01)


async def one_round(address: Address, clients: int, duration: float, tally: Tally) -> float:
    """Drive `clients` clients for `duration` seconds (and the /health poller); the round's wall time."""
    stop_health = asyncio.Event()
    health = asyncio.create_task(poll_health(address, stop_health, tally))
    watch = asyncio.create_task(watch_loop(stop_health, tally))
    started = time.monotonic()
    await asyncio.gather(*(client(address, started, started + duration, tally) for _ in range(clients)))
    stop_health.set()
    await health
    await watch
    return time.monotonic() - started


def run(base_url: str, web_pid: int, clients: int, duration: float, tokens: int, rounds: int) -> dict:
    """Drive the load `rounds` times; return the figures of all rounds together."""
    tally, address = Tally(), Address(base_url, tokens)
    memory = [tree_rss_mb(web_pid)]
    wall, starts = 0.0, []
    for _ in range(rounds):
        starts.append(time.time())
        wall += asyncio.run(one_round(address, clients, duration, tally))
        time.sleep(SETTLE_S)
        memory.append(tree_rss_mb(web_pid))
    return {"tally": tally, "wall_s": wall, "memory": memory, "starts": starts}


def api_refusal_times(log: Path, starts: list[float]) -> tuple[list[float], list[float]]:
    """Seconds each refused stream spent inside the API, from its access log: those that arrived after each
    round's opening OPENING_S, and those within it."""
    later, opening = [], []
    for match in REFUSAL_LINE.finditer(log.read_text(errors="replace")):
        seconds = float(match.group(2))
        arrived = time.mktime(time.strptime(match.group(1)[:19], "%Y-%m-%d %H:%M:%S")) + \
            int(match.group(1)[20:]) / 1000 - seconds
        into_round = arrived - max((start for start in starts if start <= arrived + 0.01), default=arrived)
        (opening if into_round < OPENING_S else later).append(seconds)
    return later, opening


def ms(values: list[float], q: float) -> str:
    return f"{1000 * percentile(values, q):.0f}" if values else "-"


def report(figures: dict, clients: int, duration: float, tokens: int, rounds: int) -> str:
    tally: Tally = figures["tally"]
    generated = sum(tally.completed)
    memory = " / ".join(f"{mb:.0f}" for mb in figures["memory"])
    server, server_opening = figures["api_refusals"]
    opening = tally.opening_refusals
    lines = [
        f"Machine: {machine()}; load average at the start {figures['load']:.1f}. `python -m bench.load "
        f"--clients {clients} --duration {duration:g} --tokens {tokens} --rounds {rounds}`: one CPU worker "
        "(MAX_BATCH_SIZE 32, default admission settings), 2 gunicorn processes x 64 threads, clients (one asyncio "
        "loop) released together, each sending greedy `/stream`s one after another and waiting `Retry-After-Ms` after "
        "a 429. Figures of all rounds together.",
        "",
        "| what | figure |",
        "|---|---|",
        f"| streams completed / failed / hung | {len(tally.completed)} / {len(tally.failed)} / {len(tally.hung)} |",
        f"| tokens received (completed streams), aggregate tokens/s | {generated}, "
        f"{generated / figures['wall_s']:.0f} |",
        f"| 429 refusals after each round's first second; their latency as clients saw it, p50 / p95 / max (ms) | "
        f"{len(tally.refusals)}; {ms(tally.refusals, 50)} / {ms(tally.refusals, 95)} / {ms(tally.refusals, 100)} |",
        f"| the same refusals' time inside the API (access log), p50 / p95 / max (ms) | {ms(server, 50)} / "
        f"{ms(server, 95)} / {ms(server, 100)} |",
        f"| 429 refusals of the clients' simultaneous first requests (the first second): clients' view, p50 / p95 / "
        f"max (ms); inside the API p95 | {len(opening)}; {ms(opening, 50)} / {ms(opening, 95)} / {ms(opening, 100)}; "
        f"{ms(server_opening, 95)} |",
        f"| Retry-After(-Ms) sent, median (s) | {median(tally.retry_after) if tally.retry_after else 0:.1f} |",
        f"| admitted streams' first token p50 / p95 / max (ms) | {ms(tally.first_tokens, 50)} / "
        f"{ms(tally.first_tokens, 95)} / {ms(tally.first_tokens, 100)} |",
        f"| `/health` during the load p50 / p95 / max (ms), errors | {ms(tally.health, 50)} / "
        f"{ms(tally.health, 95)} / {ms(tally.health, 100)}, {len(tally.health_errors)} |",
        f"| API memory (MB): idle, then {SETTLE_S} s after each round | {memory} |",
        f"| the driver's own event-loop lag p50 / p99 / max (ms) | {ms(tally.loop_lag, 50)} / "
        f"{ms(tally.loop_lag, 99)} / {ms(tally.loop_lag, 100)} |",
    ]
    if tally.failed:
        lines += ["", f"First failure: {tally.failed[0]}"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--redis-url", default="redis://localhost:6379/10")
    parser.add_argument("--write", action="store_true", help="record the table in BENCHMARKS.md")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    with running_service_group(args.redis_url, 32, GUNICORN_THREADS="64") as (base_url, group):
        # Warm up: every gunicorn process loads its tokenizer, the worker compiles its decode step for
        # batch sizes up to 32.
        warm_up_service(base_url, PROMPT, streams=32, tokens=8)
        figures = run(base_url, group.processes["web"].pid, args.clients, args.duration, args.tokens, args.rounds)
        figures["api_refusals"] = api_refusal_times(group.log_dir / "web.log", figures["starts"])
    figures["load"] = load
    text = report(figures, args.clients, args.duration, args.tokens, args.rounds)
    print(text)
    if args.write:
        write_section("Load: 200 clients at one worker", text)


if __name__ == "__main__":
    main()
