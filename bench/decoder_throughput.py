"""Decode tokens/s of the INT8 decoder, the fp32 path and transformers' generate(), in one run.

    python -m bench.decoder_throughput [--tokens 64] [--repeats 3] [--batches 1 8 32] [--write]

Every configuration generates exactly `--tokens` new tokens per sequence (EOS ignored) from the same
prompt, and separately just one (the prefill and its first token). Decode tokens/s = batch x (tokens - 1)
/ (median time for all tokens - median time for one), the same for every configuration, so prompt
processing counts for none of them. transformers runs fp32 and with torch's dynamic INT8 quantization.
The INT8 decoder compiles its decode step as the CPU worker does (COMPILE_DECODE, default on).
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
from workers.gpu.decoder import CUDADecoder

PROMPT = "Write a short story about a robot who learns to paint."


def time_engine(decoder, tokenizer, prompt_ids, batch, tokens) -> float:
    engine = Engine(decoder, tokenizer.backend, eos_token_ids=[])
    params = SamplingParams(max_tokens=tokens, temperature=0.0)
    sequences = [Sequence(str(i), prompt_ids, params, tokenizer.backend) for i in range(batch)]
    start = time.perf_counter()
    engine.run(sequences)
    return time.perf_counter() - start


def time_generate(model, prompt_ids, batch, tokens) -> float:
    inputs = torch.tensor([prompt_ids] * batch)
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=tokens,
                       min_new_tokens=tokens, do_sample=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = parser.parse_args()
    force_offline()
    settings = Settings.from_env()
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    tokenizer = load_tokenizer(settings.model_dir)
    prompt_ids = tokenizer.encode_chat([{"role": "user", "content": PROMPT}])
    biggest = max(args.batches)
    length = len(prompt_ids) + args.tokens + 1
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(settings.model_dir, dtype=torch.float32).eval()
    hf_int8 = torch.ao.quantization.quantize_dynamic(
        AutoModelForCausalLM.from_pretrained(settings.model_dir, dtype=torch.float32).eval(),
        {torch.nn.Linear}, dtype=torch.qint8)
    runners = {
        "INT8Decoder (ours)": lambda b, n: time_engine(int8, tokenizer, prompt_ids, b, n),
        "fp32 path (CUDADecoder on CPU, ours)": lambda b, n: time_engine(fp32, tokenizer, prompt_ids, b, n),
        "transformers generate fp32": lambda b, n: time_generate(hf, prompt_ids, b, n),
        "transformers generate + dynamic INT8": lambda b, n: time_generate(hf_int8, prompt_ids, b, n),
    }
    int8 = INT8Decoder.from_settings(settings, max_batch_size=biggest, max_seq_len=length)
    fp32 = CUDADecoder(device="cpu", max_batch_size=biggest, max_seq_len=length).load_weights(settings.model_path)
    results: dict[str, dict[int, float]] = {name: {} for name in runners}
    for batch in args.batches:
        for name, run in runners.items():
            run(batch, 4)  # warm-up
            whole = median([run(batch, args.tokens) for _ in range(args.repeats)])
            first = median([run(batch, 1) for _ in range(args.repeats)])
            results[name][batch] = batch * (args.tokens - 1) / (whole - first)
            print(f"{name:40s} batch {batch:3d}: {results[name][batch]:7.1f} tok/s", flush=True)
    header = "| decoder | " + " | ".join(f"batch {b}" for b in args.batches) + " |"
    rows = [header, "|---|" + "---|" * len(args.batches)]
    rows += [f"| {name} | " + " | ".join(f"{r[b]:.1f}" for b in args.batches) + " |" for name, r in results.items()]
    ours, baseline = results["INT8Decoder (ours)"], results["transformers generate + dynamic INT8"]
    notes = [f"INT8 batch 1 vs transformers + dynamic INT8 batch 1: "
             f"{ours[args.batches[0]] / baseline[args.batches[0]]:.2f}x"]
    if 8 in ours:
        notes.append(f"INT8 batch 8 vs its own batch 1: {ours[8] / ours[args.batches[0]]:.2f}x")
    table = "\n".join(rows)
    print(table)
    print("\n".join(notes))
    if args.write:
        mode = " with INT8_RESIDUAL=1" if settings.int8_residual else ""
        write_section(f"Decoder throughput (decode tokens/s){mode}",
                      f"Machine: {machine()}, torch threads {torch.get_num_threads()}. {args.tokens} new tokens per "
                      f"sequence, prefill excluded (see the script), medians of {args.repeats} runs, all in one run of "
                      f"`python -m bench.decoder_throughput`; INT8 decode step compiled: {settings.compile_decode}.\n\n"
                      f"{table}\n\n" + "\n".join(f"- {n}" for n in notes))


if __name__ == "__main__":
    main()
