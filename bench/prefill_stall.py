"""How long a new prompt's prefill stalls the streams already running, by prefill chunk size.

    python -m bench.prefill_stall [--running 8] [--prompt-tokens 1500] [--chunks 64 128 256 512 0] [--write]

In-process INT8 engine: `--running` sequences decode; then a long prompt arrives. For each chunk size
(0 = the whole prompt in one pass) it reports the median decode step without a prefill, the longest
step while the prompt was being prefilled (the stall a running stream sees between two tokens), and the
new prompt's time to first token.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import machine, median, write_section
from shared.model_files import force_offline
from shared.sampling import SamplingParams
from shared.settings import Settings
from shared.tokenizer import load_tokenizer
from workers.cpu.decoder import INT8Decoder
from workers.engine.engine import Engine
from workers.engine.sequence import Sequence


def measure(decoder, tokenizer, running: int, prompt_tokens: int, chunk: int) -> tuple[float, float, float]:
    engine = Engine(decoder, tokenizer.backend, eos_token_ids=[], prefill_chunk=chunk or prompt_tokens)
    params = SamplingParams(max_tokens=400, temperature=0)  # more than the measurement takes
    short = tokenizer.encode("Tell me about the history of the printing press.")
    streams = [Sequence(f"s{i}", short, params, tokenizer.backend) for i in range(running)]
    for sequence in streams:
        engine.add(sequence)
    while len(engine.running) < running:
        engine.step()
    steady = []
    for _ in range(5):
        start = time.perf_counter()
        engine.step()
        steady.append(time.perf_counter() - start)
    long_prompt = (tokenizer.encode("The quick brown fox jumps over the lazy dog. ") * prompt_tokens)[:prompt_tokens]
    newcomer = Sequence("long", long_prompt, SamplingParams(max_tokens=2, temperature=0), tokenizer.backend)
    engine.add(newcomer)
    arrived, stalls = time.perf_counter(), []
    while not newcomer.output_ids:
        start = time.perf_counter()
        engine.step()
        stalls.append(time.perf_counter() - start)
    return median(steady), max(stalls), time.perf_counter() - arrived


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--running", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=1500)
    parser.add_argument("--chunks", type=int, nargs="+", default=[64, 128, 256, 512, 0])
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    force_offline()
    settings = Settings.from_env()
    tokenizer = load_tokenizer(settings.model_dir)
    decoder = INT8Decoder.from_settings(settings, max_batch_size=args.running + 1,
                                        max_seq_len=args.prompt_tokens + 512)
    rows = ["| prefill chunk | decode step (median) | longest step during the prefill | new prompt's TTFT |",
            "|---|---|---|---|"]
    for chunk in args.chunks:
        steady, stall, ttft = measure(decoder, tokenizer, args.running, args.prompt_tokens, chunk)
        label = str(chunk) if chunk else f"none ({args.prompt_tokens} at once)"
        rows.append(f"| {label} | {steady * 1000:.0f} ms | {stall * 1000:.0f} ms | {ttft:.2f} s |")
        print(rows[-1], flush=True)
    table = "\n".join(rows)
    if args.write:
        write_section("Prefill stall (running streams vs a new long prompt)",
                      f"Machine: {machine()}, torch threads {torch.get_num_threads()}. {args.running} streams "
                      f"decoding, then a {args.prompt_tokens}-token prompt arrives; `python -m bench.prefill_stall`."
                      f"\n\n{table}")


if __name__ == "__main__":
    main()
