"""How close each arithmetic for the linear layers comes to the fp32 path's greedy output, in one run.

    python -m bench.precision_ablation [--tokens 32] [--llama-python PATH] [--speed] [--write]

How far INT8 strays from fp32 is about arithmetic, not code, so this runs the fp32 path with its linear
layers (LM head included unless named) swapped for other arithmetic, beside the two real INT8 decoders, on
24 prompts. Greedy agreement is no longer the acceptance measure (near-ties make it luck; bench.int8_quality
measures KL divergence instead), but it shows where each arithmetic stands:

- the INT8 decoder, one pass and two passes (INT8_RESIDUAL=1), as the CPU worker runs them;
- SmolLM2's own 4-bit weights (the GGUF's Q4_1 grid, recovered exactly from the fp32 weights) through
  torch's int4 CPU kernel, which takes and returns bf16;
- those exact weights with activations in bf16 but fp32 results;
- those exact weights with activations quantized to 8 bits per block of 32, as llama.cpp multiplies Q4_1;
- llama.cpp itself on the GGUF file, when `--llama-python` names a Python with llama-cpp-python.

`--speed` also times compiled decode steps at batch 1 and 8 of the INT8 decoder, one pass and two, and
of the INT8 decoder with its layer linears on torch's int4 kernel (exact 4-bit weights), alternating.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
import types

import torch
import torch.nn.functional as F

from bench.agreement import (
    CHAT_PROMPTS,
    RAW_PROMPTS,
    agreement_length,
    greedy_outputs,
    teacher_forced_logits,
    top1_agreement,
)

MORE_CHAT = (
    "How do plants make their food?", "Name three famous painters.", "What is a prime number?",
    "Write a short poem about autumn.", "Why is the sky blue?", "Suggest a name for a pet cat.",
    "How many legs does a spider have?", "Translate 'good morning' into French.",
)
MORE_RAW = (
    "The quick brown fox", "In 1969, the first humans", "import numpy as np\n", "Water boils at",
    "My favourite food is", "The theory of relativity states that", "Dear Sir or Madam,\n",
    "Photosynthesis is the process",
)
GROUP = 32
"""Q4_1's block: 32 weights share a scale and a minimum."""


def q4_1_grid(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes 0..15, scale, minimum) per block of 32 inputs; exact for weights dequantized from Q4_1."""
    rows, columns = weight.shape
    blocks = weight.view(rows, columns // GROUP, GROUP)
    minimum = blocks.amin(-1)
    scale = ((blocks.amax(-1) - minimum) / 15).half().float()  # the file stores the scale in fp16
    codes = torch.round((blocks - minimum[..., None]) / scale.clamp_min(1e-30)[..., None]).clamp(0, 15)
    assert torch.equal(codes * scale[..., None] + minimum[..., None], blocks), "not a Q4_1 weight"
    return codes.view(rows, columns).int(), scale, minimum


class Int4Linear(torch.nn.Module):
    """A layer linear on torch's int4 CPU kernel: exact 4-bit weights, bf16 in and out."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        codes, scale, minimum = q4_1_grid(weight)
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(codes, 2))
        # The kernel computes (code - 8) * scale + zero, with scale and zero in the activations' dtype.
        scales_and_zeros = torch.stack([scale.t(), (minimum + 8 * scale).t()], -1).bfloat16().contiguous()
        self.register_buffer("scales_and_zeros", scales_and_zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).bfloat16()
        out = torch._weight_int4pack_mm_for_cpu(rows, self.packed, GROUP, self.scales_and_zeros)
        return out.float().view(*x.shape[:-1], -1)


def torch_int4_kernel(linear) -> callable:
    """The layer's exact 4-bit weights through torch's int4 CPU kernel (bf16 in and out)."""
    return Int4Linear(linear.weight.data)


def bf16_activations(linear) -> callable:
    return lambda x: F.linear(x.bfloat16().float(), linear.weight)


def block8_activations(linear) -> callable:
    def forward(x):
        blocks = x.view(*x.shape[:-1], -1, GROUP)
        scale = blocks.abs().amax(-1, keepdim=True).clamp_min(1e-30) / 127
        return F.linear((torch.round(blocks / scale) * scale).view(x.shape), linear.weight)
    return forward


SIMULATIONS = {
    "exact 4-bit weights, torch int4 kernel (bf16 in and out), fp32 LM head": torch_int4_kernel,
    "exact 4-bit weights, bf16 activations, fp32 results": bf16_activations,
    "exact 4-bit weights, 8-bit activations per block of 32 (llama.cpp's Q4_1 x Q8_1 arithmetic)":
        block8_activations,
}


def simulated(load_fp32, make_forward, head: bool) -> object:
    """An fp32-path decoder whose layer linears (and LM head if `head`) run `make_forward(linear)`."""
    decoder = load_fp32()
    for name, module in decoder.model.named_modules():
        if isinstance(module, torch.nn.Linear) and (head or name != "lm_head"):
            module.forward = types.MethodType(lambda self, x, f=make_forward(module): f(x), module)
    return decoder


def step_times(settings, repeats: int = 3) -> list[str]:
    """Median compiled decode-step milliseconds at batch 1 and 8, the decoders alternating."""
    from workers.cpu.decoder import INT8Decoder
    from workers.engine.weights import fuse_projections, load_state_dict

    class Int4LayersDecoder(INT8Decoder):
        variant = "int4_layers"  # its own compiled graph

    decoders = {label: INT8Decoder.from_settings(settings, residual=residual, max_batch_size=8, max_seq_len=256)
                for label, residual in (("INT8, one pass", False), ("INT8, two passes", True))}
    probe = Int4LayersDecoder.from_settings(settings, max_batch_size=8, max_seq_len=256, compile_decode=False)
    state = fuse_projections(load_state_dict(settings.model_path))
    for layer_name, layer in probe.model.layers.named_children():
        for owner in (layer.self_attn, layer.mlp):
            for name, _child in list(owner.named_children()):
                prefix = "self_attn" if owner is layer.self_attn else "mlp"
                setattr(owner, name, Int4Linear(state[f"model.layers.{layer_name}.{prefix}.{name}.weight"]))
    probe.compile_decode = True
    probe._compile_decode_layer()
    decoders["int4 kernel layers, INT8 LM head"] = probe
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(repeats):
        for label, decoder in decoders.items():
            for batch in (1, 8):
                tokens, positions = [1] * batch, [40] * batch
                for _ in range(3):
                    decoder.decode(tokens, positions)
                start = time.perf_counter()
                for _ in range(20):
                    decoder.decode(tokens, positions)
                times.setdefault((label, batch), []).append((time.perf_counter() - start) / 20 * 1e3)
    rows = ["| decoder | step at batch 1 (ms) | step at batch 8 (ms) | batch 8 tok/s vs batch 1 |", "|---|---|---|---|"]
    for label in decoders:
        one, eight = (statistics.median(times[(label, b)]) for b in (1, 8))
        rows.append(f"| {label} | {one:.1f} | {eight:.1f} | {8 * one / eight:.2f}x |")
    return rows


def llama_cpp_outputs(python: str, gguf: str, prompt_ids: list[list[int]], tokens: int) -> list[list[int]]:
    """Greedy ids from llama.cpp (in llama-cpp-python's interpreter), fed our token ids."""
    script = (
        "import json, sys\nfrom llama_cpp import Llama\n"
        "args = json.load(sys.stdin)\n"
        "llm = Llama(model_path=args['gguf'], n_ctx=1024, n_threads=2, verbose=False)\n"
        "outs = []\n"
        "for ids in args['prompts']:\n"
        "    llm.reset(); out = []\n"
        "    for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):\n"
        "        if token == llm.token_eos() or len(out) == args['tokens']: break\n"
        "        out.append(token)\n"
        "    outs.append(out)\n"
        "print(json.dumps(outs))\n")
    result = subprocess.run([python, "-c", script], input=json.dumps(
        {"gguf": gguf, "prompts": prompt_ids, "tokens": tokens}), capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--llama-python", help="a Python with llama-cpp-python, to add llama.cpp's own output")
    parser.add_argument("--speed", action="store_true", help="also time decode steps (see above)")
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = parser.parse_args()

    from bench.common import machine, write_section
    from bench.service import gguf_model
    from shared.model_files import force_offline
    from shared.settings import Settings
    from shared.tokenizer import load_tokenizer
    from workers.cpu.decoder import INT8Decoder
    from workers.gpu.decoder import CUDADecoder

    force_offline()
    settings = Settings.from_env()
    tokenizer = load_tokenizer(settings.model_dir)
    chat = [tokenizer.encode_chat([{"role": "user", "content": t}]) for t in CHAT_PROMPTS + MORE_CHAT]
    prompt_ids = chat + [tokenizer.encode(t) for t in RAW_PROMPTS + MORE_RAW]
    slots, length = len(prompt_ids), max(map(len, prompt_ids)) + args.tokens + 1

    def load_fp32():
        return CUDADecoder(device="cpu", max_batch_size=slots, max_seq_len=length).load_weights(settings.model_path)

    reference = load_fp32()
    expected = greedy_outputs(reference, tokenizer, prompt_ids, args.tokens)
    forced_reference = torch.cat([teacher_forced_logits(reference, p, o) for p, o in zip(prompt_ids, expected)])
    rows = []

    def add(label: str, outputs: list[list[int]], decoder=None) -> None:
        agreed = [agreement_length(o, e) for o, e in zip(outputs, expected)]
        passing = sum(a >= min(16, len(e)) for a, e in zip(agreed, expected))
        forced = "n/a"
        if decoder is not None:  # same context as fp32 at every step of fp32's outputs
            logits = torch.cat([teacher_forced_logits(decoder, p, o) for p, o in zip(prompt_ids, expected)])
            forced = f"{100 * top1_agreement(logits, forced_reference):.1f}%"
        first_eight = sum(a >= min(16, len(e))
                          for a, e in zip(agreed[:4] + agreed[12:16], expected[:4] + expected[12:16]))
        rows.append(f"| {label} | {passing} of {len(agreed)} | {first_eight} of 8 | "
                    f"{sum(agreed) / len(agreed):.1f} | {forced} |")
        print(rows[-1], flush=True)

    for residual in (False, True):
        decoder = INT8Decoder.from_settings(settings, residual=residual, max_batch_size=slots, max_seq_len=length)
        add(f"INT8Decoder, {'two passes (INT8_RESIDUAL=1)' if residual else 'one pass (default)'}",
            greedy_outputs(decoder, tokenizer, prompt_ids, args.tokens), decoder)
        del decoder
    for label, make_forward in SIMULATIONS.items():
        decoder = simulated(load_fp32, make_forward, head=False)
        add(label, greedy_outputs(decoder, tokenizer, prompt_ids, args.tokens), decoder)
    decoder = simulated(load_fp32, lambda linear: lambda x: F.linear(x.bfloat16(), linear.weight.bfloat16()).float(),
                        head=True)
    add("bf16 weights and activations, bf16 results (a bf16 model), LM head included",
        greedy_outputs(decoder, tokenizer, prompt_ids, args.tokens), decoder)
    if args.llama_python:
        add("llama.cpp on the Q4_1 GGUF (llama-cpp-python, greedy)",
            llama_cpp_outputs(args.llama_python, str(gguf_model()), prompt_ids, args.tokens))

    table = "\n".join([
        "| arithmetic of the linear layers | greedy = fp32 for >= 16 tokens | the same, int8_quality's 8 prompts "
        "| mean agreeing prefix | picks fp32's token, same context |",
        "|---|---|---|---|---|", *rows])
    if args.speed:
        table += ("\n\nCompiled decode steps, medians of 3 alternating runs of 20 steps:\n\n"
                  + "\n".join(step_times(settings)))
    print(table)
    if args.write:
        write_section("Precision ablation (greedy agreement with the fp32 path)",
                      f"Machine: {machine()}. One run of `python -m bench.precision_ablation --tokens {args.tokens}`: "
                      f"{len(prompt_ids)} prompts (half chat-templated), {args.tokens} greedy tokens each; the "
                      "reference is the fp32 path (SmolLM2's Q4_1 weights dequantized). Simulated rows run the fp32 "
                      "path with its layer linears swapped (see the script).\n\n" + table)


if __name__ == "__main__":
    main()
