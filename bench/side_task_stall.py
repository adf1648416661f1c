"""How long one step of a beam search or scoring job holds the worker, with and without chunked prefill.

    python -m bench.side_task_stall [--prompt-tokens 1500] [--chunks 256 0] [--repeats 3] [--write]

A worker steps its side tasks between the batch's decode steps, so a task's longest `step()` is a gap every
running stream sees between two tokens. In-process INT8 decoder (the CPU worker's) on the real model: a
beam search (width 4, 8 new tokens, reranked) and a scoring job (4 candidates) over a long prompt, stepped
to the end with each prefill chunk size (0: the whole prompt in one pass, as before chunking). Reported:
steps, the longest step and the whole job's time (medians over the repeats, the chunk sizes alternating).
Before chunking a scoring job was one step, so its stall then was the whole job's time.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import machine, median, write_section
from shared.model_files import force_offline
from shared.protocol import BeamOptions, GenerationJob, JobKind, ScoreOptions
from shared.sampling import SamplingParams
from shared.settings import Settings
from shared.tokenizer import load_tokenizer
from workers.cpu.decoder import INT8Decoder
from workers.engine.engine import Engine
from workers.features.tasks import SIDE_TASKS, load_reranker

CANDIDATES = ["The fox jumps over the dog.", "A quick brown fox, again and again.",
              "It is a sentence that uses every letter of the alphabet.", "Dogs are lazy."]


def job(kind: str, prompt_ids: list[int]) -> GenerationJob:
    options = ({"beam": BeamOptions(beam_width=4, context="the quick brown fox")} if kind == "beam"
               else {"score": ScoreOptions(candidates=CANDIDATES, context="the quick brown fox")})
    return GenerationJob(job_id=kind, prompt_ids=prompt_ids, kind=JobKind(kind),
                         sampling=SamplingParams(max_tokens=8), **options)


def measure(engine: Engine, reranker, kind: str, prompt_ids: list[int]) -> tuple[int, float, float]:
    """Steps, longest step and total seconds of one job."""
    task = SIDE_TASKS[JobKind(kind)](job(kind, prompt_ids), engine, reranker)
    steps, finished = [], False
    while not finished:
        start = time.perf_counter()
        _, finished = task.step()
        steps.append(time.perf_counter() - start)
    return len(steps), max(steps), sum(steps)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompt-tokens", type=int, default=1500)
    parser.add_argument("--chunks", type=int, nargs="+", default=[256, 0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    force_offline()
    settings = Settings.from_env()
    tokenizer = load_tokenizer(settings.model_dir)
    decoder = INT8Decoder.from_settings(settings, max_batch_size=8, max_seq_len=args.prompt_tokens + 64)
    reranker = load_reranker()
    prompt = (tokenizer.encode("The quick brown fox jumps over the lazy dog. ") * args.prompt_tokens)
    prompt = prompt[: args.prompt_tokens]
    engines = {chunk: Engine(decoder, tokenizer.backend, tokenizer.eos_token_ids,
                             prefill_chunk=chunk or args.prompt_tokens) for chunk in args.chunks}
    results: dict[tuple[str, int], list[tuple[int, float, float]]] = {}
    for _ in range(args.repeats):
        for kind in ("beam", "score"):
            for chunk in args.chunks:  # alternating, so a busy spell of the machine hits both alike
                results.setdefault((kind, chunk), []).append(measure(engines[chunk], reranker, kind, prompt))
    rows = ["| job | prefill chunk | steps | longest step | whole job |", "|---|---|---|---|---|"]
    for (kind, chunk), runs in results.items():
        label = str(chunk) if chunk else f"none ({args.prompt_tokens} at once)"
        name = "beam search (width 4, 8 tokens, reranked)" if kind == "beam" else "scoring (4 candidates)"
        rows.append(f"| {name} | {label} | {runs[0][0]} | {median([r[1] for r in runs]) * 1000:.0f} ms "
                    f"| {median([r[2] for r in runs]) * 1000:.0f} ms |")
        print(rows[-1], flush=True)
    if args.write:
        write_section("Side task stall (one beam or scoring step, long prompt)",
                      f"Machine: {machine()}, torch threads {torch.get_num_threads()}. A {args.prompt_tokens}-token "
                      f"prompt, medians of {args.repeats} runs; `python -m bench.side_task_stall`. Before prefill "
                      "was chunked, a beam search's first step prefilled the whole prompt (the `none` row) and a "
                      "scoring job was a single step (its whole time was one stall).\n\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
