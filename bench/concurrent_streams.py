"""N concurrent SSE clients through the full stack on one CPU worker, beside llama.cpp's server.

    python -m bench.concurrent_streams [--tokens 64] [--streams 1 8 32] [--llama-streams 1 8]
                                       [--redis-url redis://localhost:6379/12] [--llama-python PATH] [--write]

For each N, N client threads are released together by a barrier; each does a streaming `POST /stream`
(greedy, `--tokens` new tokens, the same chat prompt) and records its send time, first-token time and
every token's arrival. Per N: aggregate tokens/s = all tokens / (last token of any stream - first send),
median and p95 time to first token, median and p95 inter-token latency (every gap of every stream).

The service is gunicorn (web) + one RQ cpu worker from the Procfile (MAX_BATCH_SIZE `--max-batch-size`,
at least the largest N) on a flushed Redis db, warmed up with a few concurrent short streams (so every
gunicorn process has loaded its tokenizer). It is stopped before llama-cpp-python's OpenAI server is
started on the same model's GGUF (`/v1/chat/completions`, stream, `min_tokens` = `max_tokens`; it serves
one request at a time, none interrupted), warmed up with one stream and measured the same way at
`--llama-streams`. The clients run in this process on the same machine as the servers, for both.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from bench.common import machine, median, percentile, write_section
from bench.service import (
    DEFAULT_LLAMA_PYTHON,
    LONG_ANSWER_PROMPT,
    StreamTiming,
    gguf_model,
    llama_available,
    run_concurrently,
    running_llama_server,
    running_service,
    service_environment,
    stream_llama,
    stream_ours,
    warm_up_service,
)
from shared.model_files import force_offline
from shared.settings import Settings
from shared.tokenizer import load_tokenizer

PROMPT = LONG_ANSWER_PROMPT
OURS, LLAMA = "ours (end-to-end)", "llama.cpp server"
WARMUP_TOKENS = 8


def summarize(runs: list[StreamTiming]) -> dict[str, float]:
    """Aggregate tokens/s, TTFT and inter-token latency percentiles of one concurrent round."""
    start = min(r.sent for r in runs)
    end = max(r.token_times[-1] for r in runs)
    tokens = sum(r.tokens for r in runs)
    ttfts = [r.ttft for r in runs]
    gaps = [gap for r in runs for gap in r.gaps] or [float("nan")]
    return {"tokens": tokens, "aggregate": tokens / (end - start), "ttft_p50": median(ttfts),
            "ttft_p95": percentile(ttfts, 95), "itl_p50": median(gaps), "itl_p95": percentile(gaps, 95)}


def measure(label: str, counts: list[int], stream: Callable[[], StreamTiming]) -> dict[int, dict[str, float]]:
    results = {}
    for n in counts:
        results[n] = summarize(run_concurrently(n, stream))
        print(f"{label:20s} N={n:3d}: {results[n]['aggregate']:7.1f} tok/s, TTFT p50 "
              f"{results[n]['ttft_p50']:.2f} s", flush=True)
    return results


def measure_llama(args, messages: list[dict]) -> dict[int, dict[str, float]]:
    """llama.cpp's server on the GGUF file, started after ours has stopped, warmed up with one stream."""
    with running_llama_server(args.llama_python, gguf_model(), args.llama_threads) as base_url:
        stream_llama(base_url, messages, WARMUP_TOKENS)
        return measure(LLAMA, args.llama_streams, lambda: stream_llama(base_url, messages, args.tokens))


def table(results: dict[str, dict[int, dict[str, float]]]) -> str:
    rows = ["| system | streams | tokens | aggregate tok/s | TTFT p50 (s) | TTFT p95 (s) "
            "| ITL p50 (ms) | ITL p95 (ms) |",
            "|---|---|---|---|---|---|---|---|"]
    for name, by_n in results.items():
        for n, r in by_n.items():
            rows.append(f"| {name} | {n} | {r['tokens']} | {r['aggregate']:.1f} | {r['ttft_p50']:.2f} | "
                        f"{r['ttft_p95']:.2f} | {r['itl_p50'] * 1000:.0f} | {r['itl_p95'] * 1000:.0f} |")
    return "\n".join(rows)


def target_lines(results: dict[str, dict[int, dict[str, float]]]) -> list[str]:
    """The issue's targets, each with its measured value, where this run has the numbers."""
    ours, llama = results.get(OURS, {}), results.get(LLAMA, {})
    checks = []
    if 1 in ours and 8 in ours:
        checks.append(("aggregate at 8 streams / our single stream", ours[8]["aggregate"] / ours[1]["aggregate"], 4.0))
    if 8 in ours and 8 in llama:
        checks.append(("aggregate at 8 streams / llama.cpp at 8", ours[8]["aggregate"] / llama[8]["aggregate"], 3.5))
    if 1 in ours and 32 in ours:
        checks.append(("aggregate at 32 streams / our single stream",
                       ours[32]["aggregate"] / ours[1]["aggregate"], 7.0))
    lines = [f"{what}: {value:.2f}x ({'meets' if value >= goal else 'misses'} the {goal}x target)"
             for what, value, goal in checks]
    if 8 in ours:
        ttft = ours[8]["ttft_p50"]
        lines.append(f"median TTFT at 8 streams: {ttft:.2f} s "
                     f"({'meets' if ttft < 0.5 else 'misses'} the < 0.5 s target)")
    return lines


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per stream")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32], help="concurrent clients (ours)")
    parser.add_argument("--llama-streams", type=int, nargs="*", default=[1, 8], help="concurrent clients (llama.cpp)")
    parser.add_argument("--prompt", default=PROMPT, help="the user message (chat template applied)")
    parser.add_argument("--redis-url", default="redis://localhost:6379/12", help="a Redis db to flush and use")
    parser.add_argument("--max-batch-size", type=int, default=32, help="MAX_BATCH_SIZE of the worker")
    parser.add_argument("--llama-python", default=DEFAULT_LLAMA_PYTHON,
                        help="Python with llama-cpp-python[server] installed")
    parser.add_argument("--llama-threads", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = parser.parse_args()
    args.max_batch_size = max(args.max_batch_size, *args.streams)
    return args


def main() -> None:
    args = parse_args()
    force_offline()
    settings = Settings.from_env(service_environment(args.redis_url, args.max_batch_size))
    messages = [{"role": "user", "content": args.prompt}]
    prompt = load_tokenizer(settings.model_dir).render_chat(messages)
    results: dict[str, dict[int, dict[str, float]]] = {}
    with running_service(args.redis_url, args.max_batch_size) as base_url:
        warm_up_service(base_url, prompt)
        results[OURS] = measure(OURS, args.streams, lambda: stream_ours(base_url, prompt, args.tokens))
    notes = []
    if args.llama_streams and llama_available(args.llama_python):
        results[LLAMA] = measure_llama(args, messages)
    elif args.llama_streams:
        notes.append(f"llama.cpp rows skipped: {args.llama_python} does not exist (pass --llama-python)")
    text = table(results)
    notes = target_lines(results) + notes
    print(text)
    print("\n".join(notes))
    if args.write:
        write_section("Concurrent streams (one CPU worker)",
                      f"Machine: {machine()}. `python -m bench.concurrent_streams --tokens {args.tokens}`: N client "
                      f"threads released together, each streaming {args.tokens} greedy tokens of the chat prompt "
                      f"\"{args.prompt}\"; one cpu worker (MAX_BATCH_SIZE {args.max_batch_size}, MAX_SEQ_LEN "
                      f"{settings.max_seq_len}); llama.cpp server with {args.llama_threads} threads. Aggregate = all "
                      f"tokens / (last token - first send); ITL = inter-token latency.\n\n{text}\n\n"
                      + "\n".join(f"- {n}" for n in notes))


if __name__ == "__main__":
    main()
