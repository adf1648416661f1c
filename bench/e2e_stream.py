"""One stream through the whole stack beside the in-process decoder and llama.cpp's server, in one run.

    python -m bench.e2e_stream [--tokens 128] [--repeats 3] [--redis-url redis://localhost:6379/12]
                               [--llama-python PATH] [--llama-threads 2] [--write]

Three systems get the same chat prompt, greedy, `--tokens` new tokens, one after another (never two
heavy processes at once):

1. in-process: the INT8Decoder + Engine inside this process, with the worker's settings; a token
   "arrives" when `Engine.step()` returns its update;
2. end-to-end: `POST /stream` on gunicorn (web) + one RQ cpu worker started from the Procfile on a
   flushed Redis db (HTTP -> Redis -> worker -> pub/sub -> SSE); a token arrives with its SSE `token` event;
3. llama.cpp: llama-cpp-python's OpenAI server (`/v1/chat/completions`, stream) on the same model's
   GGUF file, with `min_tokens` = `max_tokens` so it never stops early; a token arrives with its chunk.
   Skipped, and said so, when `--llama-python` does not exist.

Per run: TTFT (request sent -> first token), decode tokens/s (tokens after the first / first-to-last
token time) and overall tokens/s (tokens / sent-to-last token time). Each system is warmed up first
(our service with a few concurrent short streams, so every gunicorn process has loaded its tokenizer),
then the median of `--repeats` runs is reported. Our stack stops at EOS, so the prompt asks for a long
answer; actual token counts are reported. llama.cpp reuses the KV of a repeated prompt prefix, which
can only lower its TTFT.
"""

from __future__ import annotations

import argparse
import gc
import time

from bench.common import machine, median, write_section
from bench.service import (
    DEFAULT_LLAMA_PYTHON,
    LONG_ANSWER_PROMPT,
    StreamTiming,
    gguf_model,
    llama_available,
    running_llama_server,
    running_service,
    service_environment,
    stream_llama,
    stream_ours,
    warm_up_service,
)
from shared.model_files import force_offline
from shared.sampling import SamplingParams
from shared.settings import Settings
from shared.tokenizer import load_tokenizer

PROMPT = LONG_ANSWER_PROMPT
WARMUP_TOKENS = 8
TARGET_VS_IN_PROCESS = 0.9
TARGET_VS_LLAMA = 0.7


def time_in_process(engine, prompt_ids: list[int], tokens: int) -> StreamTiming:
    """One sequence alone through the engine, timing each token as its step returns."""
    from workers.engine.sequence import Sequence

    timing = StreamTiming(time.perf_counter())
    sequence = Sequence("bench", prompt_ids, SamplingParams(max_tokens=tokens, temperature=0.0), engine.tokenizer)
    engine.add(sequence)
    while not sequence.finished:
        for update in engine.step():
            if update.token is not None:
                timing.token_times.append(time.perf_counter())
    return timing


def measure_in_process(settings: Settings, prompt_ids: list[int], tokens: int, repeats: int) -> list[StreamTiming]:
    """The CPU worker's decoder and engine, built as the worker builds them, in this process."""
    from workers.cpu.decoder import INT8Decoder
    from workers.engine.engine import Engine

    tokenizer = load_tokenizer(settings.model_dir)
    decoder = INT8Decoder.from_settings(settings)
    engine = Engine(decoder, tokenizer.backend, tokenizer.eos_token_ids, prefill_chunk=settings.prefill_chunk,
                    max_tokens_in_flight=settings.max_tokens_in_flight)
    time_in_process(engine, prompt_ids, WARMUP_TOKENS)
    return [time_in_process(engine, prompt_ids, tokens) for _ in range(repeats)]


def measure_service(args, prompt: str) -> list[StreamTiming]:
    with running_service(args.redis_url, args.max_batch_size) as base_url:
        warm_up_service(base_url, prompt, tokens=WARMUP_TOKENS)
        return [stream_ours(base_url, prompt, args.tokens) for _ in range(args.repeats)]


def measure_llama(args, messages: list[dict]) -> list[StreamTiming]:
    with running_llama_server(args.llama_python, gguf_model(), args.llama_threads) as base_url:
        stream_llama(base_url, messages, WARMUP_TOKENS)
        return [stream_llama(base_url, messages, args.tokens) for _ in range(args.repeats)]


def summarize(runs: list[StreamTiming]) -> dict[str, float]:
    return {"tokens": median([r.tokens for r in runs]), "ttft": median([r.ttft for r in runs]),
            "decode": median([r.decode_tps for r in runs]), "overall": median([r.overall_tps for r in runs])}


def table(results: dict[str, dict[str, float]], counts: dict[str, list[int]]) -> str:
    rows = ["| system | new tokens (each run) | TTFT (ms) | decode tok/s | overall tok/s |", "|---|---|---|---|---|"]
    for name, r in results.items():
        rows.append(f"| {name} | {', '.join(map(str, counts[name]))} | {r['ttft'] * 1000:.0f} | "
                    f"{r['decode']:.1f} | {r['overall']:.1f} |")
    return "\n".join(rows)


def ratio_lines(results: dict[str, dict[str, float]]) -> list[str]:
    ours = results["end-to-end (HTTP -> Redis -> worker -> SSE)"]
    lines = []
    for name, target in (("in-process INT8Decoder + Engine", TARGET_VS_IN_PROCESS),
                         ("llama.cpp server (OpenAI chat route)", TARGET_VS_LLAMA)):
        if name not in results:
            continue
        for metric in ("decode", "overall"):
            value = ours[metric] / results[name][metric]
            verdict = "meets" if value >= target else "misses"
            lines.append(f"end-to-end / {name}, {metric} tok/s: {value:.2f}x ({verdict} the {target}x target)")
    return lines


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per request")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt", default=PROMPT, help="the user message (chat template applied)")
    parser.add_argument("--redis-url", default="redis://localhost:6379/12", help="a Redis db to flush and use")
    parser.add_argument("--max-batch-size", type=int, default=32, help="MAX_BATCH_SIZE of the worker")
    parser.add_argument("--llama-python", default=DEFAULT_LLAMA_PYTHON,
                        help="Python with llama-cpp-python[server] installed")
    parser.add_argument("--llama-threads", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    force_offline()
    settings = Settings.from_env(service_environment(args.redis_url, args.max_batch_size))
    tokenizer = load_tokenizer(settings.model_dir)
    messages = [{"role": "user", "content": args.prompt}]
    prompt = tokenizer.render_chat(messages)
    prompt_ids = tokenizer.encode(prompt)
    runs: dict[str, list[StreamTiming]] = {}
    print(f"prompt: {len(prompt_ids)} tokens; in-process ...", flush=True)
    runs["in-process INT8Decoder + Engine"] = measure_in_process(settings, prompt_ids, args.tokens, args.repeats)
    gc.collect()  # the decoder is gone before the service loads its own copy
    print("end-to-end ...", flush=True)
    runs["end-to-end (HTTP -> Redis -> worker -> SSE)"] = measure_service(args, prompt)
    skipped = None
    if llama_available(args.llama_python):
        print("llama.cpp server ...", flush=True)
        runs["llama.cpp server (OpenAI chat route)"] = measure_llama(args, messages)
    else:
        skipped = f"llama.cpp column skipped: {args.llama_python} does not exist (pass --llama-python)"
    results = {name: summarize(r) for name, r in runs.items()}
    counts = {name: [t.tokens for t in r] for name, r in runs.items()}
    text = table(results, counts)
    notes = ratio_lines(results) + ([skipped] if skipped else [])
    if any(c < args.tokens for c in counts["end-to-end (HTTP -> Redis -> worker -> SSE)"]):
        notes.append(f"our stack stopped at EOS before {args.tokens} tokens in some runs")
    print(text)
    print("\n".join(notes))
    if args.write:
        write_section("End-to-end single stream",
                      f"Machine: {machine()}. `python -m bench.e2e_stream --tokens {args.tokens} --repeats "
                      f"{args.repeats}`: one greedy stream of the chat prompt \"{args.prompt}\" ({len(prompt_ids)} "
                      f"tokens), median of {args.repeats} runs after a warm-up; worker MAX_BATCH_SIZE "
                      f"{settings.max_batch_size}, MAX_SEQ_LEN {settings.max_seq_len}; llama.cpp server with "
                      f"{args.llama_threads} threads.\n\n{text}\n\n" + "\n".join(f"- {n}" for n in notes))


if __name__ == "__main__":
    main()
