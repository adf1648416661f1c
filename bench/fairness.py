"""A short stream's first token while a big batch or two of the widest beam searches run on the same worker.

    python -m bench.fairness [--probes 5] [--redis-url redis://localhost:6379/10] [--write]

Starts the Procfile's web and cpu processes (one worker, MAX_BATCH_SIZE 32) on a flushed Redis db. Three
phases, each measuring `--probes` short greedy `/stream`s (8 tokens) sent one after another:

1. idle: nothing else runs;
2. batch: a `/generate_batch` of 64 long prompts (~400 tokens each, 64 tokens each) was sent 3 s earlier;
3. beams: two `/stream_chat_beam` of width 8 (the widest) and 256 tokens were started 3 s earlier.

Reported per phase: each probe's first-token latency (request sent -> first `token` event) and whether the
background work was still running when the last probe ended. Target (issue): within 2 s while the batch or
the beams run.
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import requests

from bench.common import machine, median, write_section
from bench.service import running_service
from tests.sse_client import iter_events

PROBE = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0, "backend": "cpu"}
LONG_PROMPT = " ".join(f"Item {i} of the inventory is a box of {i % 7 + 2} red apples." for i in range(30))
"""About 400 tokens."""


def first_token_s(base_url: str) -> float:
    """Send one probe stream; seconds to its first token (it is read to the end)."""
    sent = time.perf_counter()
    first = None
    with requests.post(f"{base_url}/stream", json=PROBE, stream=True, timeout=120) as response:
        response.raise_for_status()
        for event in iter_events(response):
            if event.event == "token" and first is None:
                first = time.perf_counter() - sent
            elif event.event in ("done", "error"):
                break
    if first is None:
        raise RuntimeError("a probe got no token")
    return first


def probes(base_url: str, count: int) -> list[float]:
    return [first_token_s(base_url) for _ in range(count)]


def batch_phase(base_url: str, count: int) -> tuple[list[float], bool]:
    body = {"prompts": [f"{i}. {LONG_PROMPT}" for i in range(64)], "max_tokens": 64, "temperature": 0,
            "wait": False, "backend": "cpu"}
    accepted = requests.post(f"{base_url}/generate_batch", json=body, timeout=60)
    accepted.raise_for_status()
    time.sleep(3)
    timings = probes(base_url, count)
    status = requests.get(f"{base_url}/batches/{accepted.json()['batch_id']}", timeout=10).json()
    still_running = status["status"] == "running"
    while requests.get(f"{base_url}/batches/{accepted.json()['batch_id']}", timeout=10).json()["status"] != "done":
        time.sleep(2)
    return timings, still_running


def beam_phase(base_url: str, count: int) -> tuple[list[float], bool]:
    body = {"messages": ["Tell me a long story about the sea."], "beam_width": 8, "max_tokens": 256,
            "use_rerank": False, "backend": "cpu"}
    ended: list[float] = []

    def beam() -> None:
        with requests.post(f"{base_url}/stream_chat_beam", json=body, stream=True, timeout=900) as response:
            for event in iter_events(response):
                if event.event in ("done", "error"):
                    break
        ended.append(time.monotonic())

    threads = [threading.Thread(target=beam) for _ in range(2)]
    for thread in threads:
        thread.start()
    time.sleep(3)
    timings = probes(base_url, count)
    still_running = len(ended) < 2
    for thread in threads:
        thread.join()
    return timings, still_running


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probes", type=int, default=5)
    parser.add_argument("--redis-url", default="redis://localhost:6379/10")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    rows = []
    with running_service(args.redis_url, 32) as base_url:
        probes(base_url, 2)  # warm-up (compilation, tokenizers)
        rows.append(("idle", probes(base_url, args.probes), None))
        rows.append(("a 64-prompt batch (~400-token prompts) running", *batch_phase(base_url, args.probes)))
        rows.append(("two width-8 beam searches (256 tokens) running", *beam_phase(base_url, args.probes)))
    lines = [f"Machine: {machine()}; load average at the end {os.getloadavg()[0]:.1f}. `python -m bench.fairness "
             f"--probes {args.probes}`: one CPU worker (MAX_BATCH_SIZE 32), probes of 8 greedy tokens sent one "
             "after another.", "", "| while | probes' first token (ms) | median (ms) | background still running |",
             "|---|---|---|---|"]
    for label, timings, running in rows:
        lines.append(f"| {label} | {', '.join(f'{1000 * t:.0f}' for t in timings)} | {1000 * median(timings):.0f} "
                     f"| {'-' if running is None else 'yes' if running else 'no (ended first)'} |")
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section("Fairness: a short stream beside a batch or beam searches", text)


if __name__ == "__main__":
    main()
