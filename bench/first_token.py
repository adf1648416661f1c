"""First-token latency through our whole stack beside llama.cpp's server, both running, requests alternating.

    python -m bench.first_token [--repeats 15] [--redis-url redis://localhost:6379/12]
                                [--llama-python PATH] [--llama-threads 2] [--write]

Both servers are started and warmed up, then get the same OpenAI chat request (`POST /v1/chat/completions`,
stream, greedy, 2 tokens) one at a time, alternating which goes first: never two requests at once, so each
has the machine to itself. TTFT is request sent -> first content chunk. Two kinds of prompt:

- fresh: the user message starts with a number never sent before, so only the chat template's system
  preamble can be reused from an earlier request (llama.cpp reuses the longest matching prefix of its slot;
  ours its prefix cache, where enabled);
- repeated: the same conversation every time (a client retrying, or a page reload): all of it can be reused.

Reported: median and p90 TTFT of each system per kind, and ours / llama.cpp's (target: at most 1.0).
"""

from __future__ import annotations

import argparse
import time

from bench.common import machine, median, percentile, write_section
from bench.service import (
    DEFAULT_LLAMA_PYTHON,
    gguf_model,
    running_llama_server,
    running_service,
    stream_chat,
    warm_up_service,
)

QUESTION = "Write a haiku about the sea."
"""A short chat message: the preamble and this make a prompt of a few dozen tokens."""

FIRST_TOKEN_BUDGET = 2
"""Tokens asked per request: the first is timed, a second shows the stream goes on."""


def first_token_s(base_url: str, content: str) -> float:
    """Send one streamed greedy chat request; seconds until its first content chunk (the rest is read)."""
    timing = stream_chat(base_url, {"messages": [{"role": "user", "content": content}],
                                    "max_tokens": FIRST_TOKEN_BUDGET, "temperature": 0.0})
    if not timing.token_times:
        raise RuntimeError(f"{base_url} sent no content")
    return timing.ttft


def measure(servers: dict[str, str], repeats: int) -> dict[tuple[str, str], list[float]]:
    """TTFTs per (system, prompt kind), requests alternating between the systems."""
    times: dict[tuple[str, str], list[float]] = {}
    for url in servers.values():  # warm-up: the first request of each system pays for lazy loading
        first_token_s(url, QUESTION)
    for index in range(repeats):
        order = list(servers.items()) if index % 2 == 0 else list(reversed(servers.items()))
        for name, url in order:
            times.setdefault((name, "fresh"), []).append(first_token_s(url, f"{time.time_ns()}. {QUESTION}"))
            times.setdefault((name, "repeated"), []).append(first_token_s(url, QUESTION))
    return times


def report(times: dict[tuple[str, str], list[float]], args: argparse.Namespace) -> str:
    lines = [f"Machine: {machine()}. `python -m bench.first_token --repeats {args.repeats}`: our stack "
             f"(gunicorn + one cpu worker, defaults) and llama.cpp's server ({args.llama_threads} threads) both "
             f"running, the same streamed chat request to each in turn (`/v1/chat/completions`, greedy, "
             f"{FIRST_TOKEN_BUDGET} tokens), order alternating; TTFT = sent -> first content chunk.", "",
             "| prompt | system | TTFT p50 (ms) | TTFT p90 (ms) |", "|---|---|---|---|"]
    for (name, kind), values in times.items():
        lines.append(f"| {kind} | {name} | {1000 * median(values):.0f} | {1000 * percentile(values, 90):.0f} |")
    lines.append("")
    for kind in ("fresh", "repeated"):
        ratio = median(times[("ours", kind)]) / median(times[("llama.cpp", kind)])
        verdict = "meets" if ratio <= 1.0 else "misses"
        lines.append(f"- {kind} prompt: ours / llama.cpp's median TTFT = {ratio:.2f} ({verdict} the 1.0 target)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--redis-url", default="redis://localhost:6379/12", help="a Redis db to flush and use")
    parser.add_argument("--llama-python", default=DEFAULT_LLAMA_PYTHON)
    parser.add_argument("--llama-threads", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = parser.parse_args()
    with running_service(args.redis_url, 32) as ours, \
            running_llama_server(args.llama_python, gguf_model(), args.llama_threads) as llama:
        warm_up_service(ours, QUESTION)
        times = measure({"ours": ours, "llama.cpp": llama}, args.repeats)
    text = report(times, args)
    print(text)
    if args.write:
        write_section("First token beside llama.cpp's server", text)


if __name__ == "__main__":
    main()
