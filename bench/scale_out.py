"""Aggregate tokens/s of one CPU pool with 1 and 2 workers, at 16 concurrent streams.

`python -m bench.scale_out [--streams 16] [--tokens 64] [--repeats 2] [--write]`: a redis-server of its own,
gunicorn (the Procfile's `web`) and the Procfile's `cpu` workers in four layouts of the same 2 cores: one
worker on both cores (or on one), two workers on one core each taking up to 32 jobs, and two taking up to 8 (so 16
streams must spread). Each repeat sends the streams at once (greedy, `--tokens` each) and divides the tokens
received by the time from the first request to the last `done`; it also counts the jobs each worker ran.
Workers decode eagerly (COMPILE_DECODE=0) so that the five worker starts stay short.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import redis
import requests
from rq.job import Job

from bench.common import machine, median, write_section
from bench.relay_scale import answers
from bench.service import ROOT, ProcessGroup, free_port, procfile_commands
from tests.sse_client import iter_events

PROMPTS = ["1, 2, 3, 4, 5,", "The days of the week are Monday,", "Once upon a time", "The capital of France is"]

LAYOUTS = {
    "1 worker, 2 threads, MAX_BATCH_SIZE=32": (1, "2", "32"),
    "1 worker, 1 thread, MAX_BATCH_SIZE=32": (1, "1", "32"),
    "2 workers, 1 thread each, MAX_BATCH_SIZE=32": (2, "1", "32"),
    "2 workers, 1 thread each, MAX_BATCH_SIZE=8": (2, "1", "8"),
}
"""Layout -> (workers, TORCH_THREADS, MAX_BATCH_SIZE)."""


def stream(base_url: str, prompt: str, tokens: int) -> tuple[str, int]:
    """One greedy stream read to its end: its job id and the tokens it carried."""
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0}
    with requests.post(f"{base_url}/stream", json=body, stream=True, timeout=600) as response:
        response.raise_for_status()
        events = list(iter_events(response))
    assert events[-1].event == "done", events[-1]
    return response.headers["X-Job-Id"], sum(event.event == "token" for event in events)


def one_repeat(base_url: str, connection: redis.Redis, streams: int, tokens: int) -> tuple[float, Counter]:
    """Tokens/s of `streams` concurrent streams, and how many of their jobs each worker ran."""
    started = time.monotonic()
    with ThreadPoolExecutor(streams) as pool:
        results = list(pool.map(lambda n: stream(base_url, PROMPTS[n % len(PROMPTS)], tokens), range(streams)))
    elapsed = time.monotonic() - started
    ran_on = Counter(Job.fetch(job_id, connection=connection).worker_name for job_id, _ in results)
    return sum(count for _, count in results) / elapsed, ran_on


def measure(layout: tuple[int, str, str], args) -> tuple[list[float], list[list[int]]]:
    workers, threads, batch = layout
    redis_port, port = free_port(), free_port()
    group = ProcessGroup("scale-out")
    group.start("redis", ["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no"], {})
    url = f"redis://127.0.0.1:{redis_port}/0"
    connection = redis.Redis.from_url(url)
    group.wait_until(lambda: answers(connection), "redis")
    env = {"PATH": f"{ROOT / '.venv' / 'bin'}:/usr/bin:/bin", "PORT": str(port), "REDIS_URL": url,
           "MODEL_DIR": str(ROOT / "weights"), "BACKEND_MODE": "cpu", "WEB_CONCURRENCY": "2",
           "COMPILE_DECODE": "0", "TORCH_THREADS": threads, "MAX_BATCH_SIZE": batch, "MAX_SEQ_LEN": "512"}
    base_url = f"http://127.0.0.1:{port}"
    try:
        group.start("web", ["bash", "-c", procfile_commands()["web"]], env)
        for number in range(workers):
            group.start(f"cpu-{number}", ["bash", "-c", procfile_commands()["cpu"]], env)
        group.wait_until(lambda: requests.get(f"{base_url}/health", timeout=2).json()["workers"]["cpu"] >= workers,
                         f"{workers} workers")
        one_repeat(base_url, connection, 4, 8)  # warm-up
        rates, spreads = [], []
        for _ in range(args.repeats):
            rate, ran_on = one_repeat(base_url, connection, args.streams, args.tokens)
            rates.append(rate)
            spreads.append(sorted(ran_on.values(), reverse=True))
        return rates, spreads
    finally:
        group.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="write the section of BENCHMARKS.md")
    args = parser.parse_args()
    lines = ["| layout | aggregate tokens/s (median; runs) | jobs per worker, each run |", "|---|---|---|"]
    for label, layout in LAYOUTS.items():
        rates, spreads = measure(layout, args)
        lines.append(f"| {label} | {median(rates):.0f} ({', '.join(f'{r:.0f}' for r in rates)}) | "
                     f"{'; '.join('/'.join(map(str, s)) for s in spreads)} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines)
    if args.write:
        write_section("Scale-out: 1 and 2 CPU workers at 16 streams", f"""`python -m bench.scale_out --write` on
{machine()}. {args.streams} concurrent greedy streams of {args.tokens} tokens (four prompts), one API (2 gunicorn
processes), CPU workers decoding eagerly (COMPILE_DECODE=0), the same two cores split as the layout says;
tokens received / (first request to last `done`).

{text}
""")


if __name__ == "__main__":
    main()
