"""Quality of the INT8 decoder (or the GPU decoder in bf16 / fp16) against the fp32 path (CUDADecoder on the
CPU), in one run.

    python -m bench.int8_quality [--tokens 32] [--decoder int8|bfloat16|float16] [--write]

Prints the perplexity of both on a fixed English text (standard-library documentation whose topics the
SmoothQuant calibration in workers/preparation/smoothing.py does not use), how often their next-token choice
agrees over that text's positions, and, for 8 prompts (chat-templated and raw), how many greedy tokens
agree before the first divergence and how often INT8 picks fp32's greedy token given the same context.
The engine tests import the helpers, so both measure the same thing.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PERPLEXITY_TOPICS = ("assert", "if", "pass", "del", "return")
"""pydoc_data topics of the fixed text; the calibration text uses for, while, class, function and try."""

PERPLEXITY_TOKENS = 512

CHAT_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain recursion to a child.",
    "Give me three tips for learning to cook.",
)
RAW_PROMPTS = (
    "The history of the Roman Empire",
    "def fibonacci(n):\n",
    "Once upon a time, in a small village",
    "The best way to learn a new language is",
)


def perplexity_ids(tokenizer) -> list[int]:
    """The first 512 tokens of the fixed text."""
    import pydoc_data.topics

    text = "\n".join(pydoc_data.topics.topics[name] for name in PERPLEXITY_TOPICS)
    ids = tokenizer.encode(text)[:PERPLEXITY_TOKENS]
    assert len(ids) == PERPLEXITY_TOKENS, "the fixed text is shorter than expected"
    return ids


def prompts(tokenizer) -> list[tuple[str, list[int]]]:
    """(label, token ids) of the chat-templated prompts, then the raw ones."""
    chat = [(f"chat: {text}", tokenizer.encode_chat([{"role": "user", "content": text}])) for text in CHAT_PROMPTS]
    raw = [(f"raw: {text!r}", tokenizer.encode(text)) for text in RAW_PROMPTS]
    return chat + raw


def position_logits(decoder, ids: list[int]) -> torch.Tensor:
    """Next-token logits `[T, vocab]` at every position of `ids`, in one prefill of slot 0."""
    return decoder.model(torch.tensor([ids]), decoder.cache, slice(0, 1), [0], last_only=False)[0]


def perplexity(logits: torch.Tensor, ids: list[int]) -> float:
    """exp(mean negative log-likelihood) of ids[1:] under the logits of the positions before them."""
    return math.exp(F.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:])).item())


def top1_agreement(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """Share of positions where both pick the same most likely next token."""
    return (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()


def confident_agreement(logits: torch.Tensor, reference: torch.Tensor, threshold: float = 0.5) -> float:
    """Top-1 agreement at the positions where the reference gives its top token at least `threshold`."""
    confident = reference.float().softmax(-1).amax(-1) >= threshold
    return (logits.argmax(-1) == reference.argmax(-1))[confident].float().mean().item()


def teacher_forced_logits(decoder, prompt_ids: list[int], output_ids: list[int]) -> torch.Tensor:
    """Logits `[len(output_ids), vocab]` that predicted each output token, given the tokens before it."""
    ids = prompt_ids + output_ids
    return position_logits(decoder, ids[:-1])[len(prompt_ids) - 1:]


def agreement_length(output: list[int], reference: list[int]) -> int:
    """How many leading tokens the two outputs share (the index of the first divergence)."""
    for index, (a, b) in enumerate(zip(output, reference)):
        if a != b:
            return index
    return min(len(output), len(reference))


def greedy_outputs(decoder, tokenizer, prompt_ids: list[list[int]], tokens: int) -> list[list[int]]:
    """Greedy output ids (up to EOS or `tokens`) of every prompt, decoded as one batch."""
    from shared.sampling import SamplingParams
    from workers.engine.engine import Engine
    from workers.engine.sequence import Sequence

    engine = Engine(decoder, tokenizer.backend, tokenizer.eos_token_ids)
    params = SamplingParams(max_tokens=tokens, temperature=0.0)
    sequences = [Sequence(str(i), ids, params, tokenizer.backend) for i, ids in enumerate(prompt_ids)]
    return [s.output_ids for s in engine.run(sequences)]


@dataclass
class Quality:
    """Everything one run measures."""

    ppl_fp32: float
    ppl_int8: float
    top1: float
    top1_confident: float
    forced_tokens: int
    forced: float
    forced_confident: float
    labels: list[str]
    agreed: list[int]
    fp32_lengths: list[int]


def measure(fp32, int8, tokenizer, tokens: int) -> Quality:
    """Perplexities and agreement of the two decoders on the fixed text and the prompts."""
    text_ids = perplexity_ids(tokenizer)
    reference, quantized = position_logits(fp32, text_ids), position_logits(int8, text_ids)
    labelled = prompts(tokenizer)
    fp32_out = greedy_outputs(fp32, tokenizer, [ids for _, ids in labelled], tokens)
    int8_out = greedy_outputs(int8, tokenizer, [ids for _, ids in labelled], tokens)
    # Along the fp32 greedy outputs, INT8 predicting each next token from the same context.
    forced_int8 = torch.cat([teacher_forced_logits(int8, ids, out) for (_, ids), out in zip(labelled, fp32_out)])
    forced_fp32 = torch.cat([teacher_forced_logits(fp32, ids, out) for (_, ids), out in zip(labelled, fp32_out)])
    return Quality(
        ppl_fp32=perplexity(reference, text_ids), ppl_int8=perplexity(quantized, text_ids),
        top1=top1_agreement(quantized, reference), top1_confident=confident_agreement(quantized, reference),
        forced_tokens=len(forced_fp32), forced=top1_agreement(forced_int8, forced_fp32),
        forced_confident=confident_agreement(forced_int8, forced_fp32),
        labels=[label for label, _ in labelled], agreed=[agreement_length(q, r) for q, r in zip(int8_out, fp32_out)],
        fp32_lengths=[len(r) for r in fp32_out],
    )


def report(q: Quality, tokens: int, name: str = "INT8") -> str:
    """The results as Markdown: a summary list, then the per-prompt table; `name` is the measured decoder."""
    at_least_16 = sum(a >= min(16, n) for a, n in zip(q.agreed, q.fp32_lengths))
    change = 100 * (q.ppl_int8 / q.ppl_fp32 - 1)
    summary = [
        (f"Perplexity on the fixed text ({PERPLEXITY_TOKENS} tokens of pydoc topics "
         f"{', '.join(PERPLEXITY_TOPICS)}): fp32 {q.ppl_fp32:.3f}, {name} {q.ppl_int8:.3f} ({change:+.1f}%)"),
        (f"Top-1 next-token agreement over those positions: {100 * q.top1:.1f}% "
         f"({100 * q.top1_confident:.1f}% where fp32's top token has p >= 0.5)"),
        (f"Along the fp32 greedy outputs of the prompts ({q.forced_tokens} tokens, same context for both): "
         f"{name} picks fp32's token at {100 * q.forced:.1f}% of steps "
         f"({100 * q.forced_confident:.1f}% where fp32's p >= 0.5)"),
        (f"Greedy outputs agreeing for at least 16 tokens (or to a shared EOS): {at_least_16} of "
         f"{len(q.agreed)}; mean agreeing prefix {sum(q.agreed) / len(q.agreed):.1f} of {tokens} tokens"),
    ]
    rows = ["| prompt | tokens agreeing before the first divergence | fp32 output length |", "|---|---|---|"]
    rows += [f"| {label.replace('|', '/')} | {a} | {n} |" for label, a, n in zip(q.labels, q.agreed, q.fp32_lengths)]
    return "\n".join(f"- {line}" for line in summary) + "\n\n" + "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32, help="greedy tokens per prompt (default 32)")
    parser.add_argument("--decoder", choices=("int8", "bfloat16", "float16"), default="int8",
                        help="the decoder measured: the CPU pool's INT8, or the GPU decoder in bf16 / fp16 on the CPU")
    parser.add_argument("--write", action="store_true", help="write the results into BENCHMARKS.md")
    args = parser.parse_args()
    if args.decoder != "int8":
        return main_half(args)

    from bench.common import machine, write_section
    from shared.model_files import force_offline
    from shared.settings import Settings
    from shared.tokenizer import load_tokenizer
    from workers.cpu.decoder import INT8Decoder
    from workers.gpu.decoder import CUDADecoder

    force_offline()
    settings = Settings.from_env()
    tokenizer = load_tokenizer(settings.model_dir)
    slots, length = len(CHAT_PROMPTS) + len(RAW_PROMPTS), PERPLEXITY_TOKENS + args.tokens
    fp32 = CUDADecoder(device="cpu", max_batch_size=slots, max_seq_len=length).load_weights(settings.model_path)
    int8 = INT8Decoder.from_settings(settings, max_batch_size=slots, max_seq_len=length)
    text = report(measure(fp32, int8, tokenizer, args.tokens), args.tokens)
    print(text)
    if args.write:
        from workers.engine.int8.gemm import ACTIVATION_LEVELS

        codes = "8-bit" if ACTIVATION_LEVELS == 127 else "7-bit"
        form = ("two passes: the weights' and activations' rounding residuals too"
                if settings.int8_residual else "one pass")
        write_section("INT8 quality (vs the fp32 path)" + (", INT8_RESIDUAL=1" if settings.int8_residual else ""),
                      f"Machine: {machine()}. One run of `python -m bench.int8_quality --tokens {args.tokens}`; "
                      f"INT8 = `INT8Decoder` (SmoothQuant alpha 0.5, per-channel INT8 weights, per-row {codes} "
                      f"activation codes, {form}), fp32 = `CUDADecoder(device=\"cpu\")`, both greedy. "
                      "The greedy outputs part where fp32 itself hesitates (its top token at p < 0.5): "
                      "compare the agreement rates below with and without that condition.\n\n" + text)


def main_half(args) -> None:
    """The GPU decoder in bf16 or fp16 against itself in fp32, both on the CPU."""
    from bench.common import machine, write_section
    from shared.model_files import force_offline
    from shared.settings import Settings
    from shared.tokenizer import load_tokenizer
    from workers.gpu.decoder import CUDADecoder

    force_offline()
    settings = Settings.from_env()
    tokenizer = load_tokenizer(settings.model_dir)
    limits = {"max_batch_size": len(CHAT_PROMPTS) + len(RAW_PROMPTS), "max_seq_len": PERPLEXITY_TOKENS + args.tokens}
    fp32 = CUDADecoder(device="cpu", **limits).load_weights(settings.model_path)
    half = CUDADecoder(device="cpu", dtype=args.decoder, **limits).load_weights(settings.model_path)
    name = {"bfloat16": "bf16", "float16": "fp16"}[args.decoder]
    text = report(measure(fp32, half, tokenizer, args.tokens), args.tokens, name)
    print(text)
    if args.write:
        write_section(f"{name} quality (vs the fp32 path)",
                      f"Machine: {machine()}. One run of `python -m bench.int8_quality --decoder {args.decoder} "
                      f"--tokens {args.tokens}`; {name} = `CUDADecoder(device=\"cpu\", dtype=\"{args.decoder}\")` "
                      "(weights, activations and KV cache in that type; RMSNorm and rotary in fp32, as transformers "
                      "computes them), fp32 = the same decoder in fp32, both greedy, on the CPU. A GPU "
                      "rounds differently again: `python -m bench.gpu_check` measures it there.\n\n" + text)


if __name__ == "__main__":
    main()
