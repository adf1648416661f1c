"""Fidelity of each decoder path to the fp32 path, measured as llama.cpp measures its quantizations, in one run.

    python -m bench.int8_quality [--llama-python PATH] [--chunks 16] [--write]

A fixed English text (standard-library documentation whose topics the SmoothQuant calibration in
workers/preparation/smoothing.py does not use) is cut into chunks of CONTEXT tokens, each evaluated in one
pass from an empty cache. As llama.cpp's perplexity tool does (also with `--kl-divergence`), only the second
half of each chunk is scored, so every scored position sees at least CONTEXT / 2 tokens before it. For each
path, over those positions: the mean and 99th-percentile KL divergence of its next-token distribution from
the fp32 path's, the share of positions where its top token is fp32's, and its perplexity on the text.

Paths: one-pass INT8 (the CPU worker's default), two-pass INT8 (INT8_RESIDUAL=1), a bf16 model run on the
CPU, and, with `--llama-python` (a Python with llama-cpp-python), llama.cpp itself on the Q4_1 GGUF that the
weights were dequantized from, fed the same token ids.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

TEXT_TOPICS = ("execmodel", "import", "objects", "assignment", "comparisons")
"""pydoc_data topics of the fixed text; the calibration text uses for, while, class, function and try."""

CONTEXT = 512
"""Tokens per chunk: the context llama.cpp's perplexity figures are usually quoted at (`-c 512`)."""

CHUNKS = 16
"""Chunks scored by default: 8,192 tokens of text, 16 x 255 = 4,080 scored positions."""

PathLogits = Callable[[list[int]], torch.Tensor]
"""A decoder path: a chunk's token ids in, its next-token logits `[len(chunk), vocab]` out."""


def text_chunks(tokenizer, chunks: int = CHUNKS, context: int = CONTEXT) -> list[list[int]]:
    """The fixed text's first `chunks` chunks of `context` token ids."""
    import pydoc_data.topics

    ids = tokenizer.encode("\n".join(pydoc_data.topics.topics[name] for name in TEXT_TOPICS))
    if len(ids) < chunks * context:
        raise ValueError(f"the fixed text has {len(ids)} tokens, fewer than {chunks} chunks of {context}")
    return [ids[index * context:(index + 1) * context] for index in range(chunks)]


def position_logits(decoder, ids: list[int]) -> torch.Tensor:
    """Next-token logits `[T, vocab]` at every position of `ids`, in one prefill of slot 0."""
    return decoder.model(torch.tensor([ids]), decoder.cache, slice(0, 1), [0], last_only=False)[0]


def scored_positions(length: int) -> slice:
    """The positions of a chunk that are scored: its second half, up to the one that predicts its last token."""
    return slice(length // 2, length - 1)


@dataclass
class Fidelity:
    """One path's per-position figures against the reference, gathered chunk by chunk."""

    kl: list[torch.Tensor] = field(default_factory=list)
    same_top: list[torch.Tensor] = field(default_factory=list)
    nll: list[torch.Tensor] = field(default_factory=list)

    def add(self, reference: torch.Tensor, logits: torch.Tensor, chunk: list[int]) -> None:
        """Score one chunk; `reference` and `logits` are both `[len(chunk), vocab]`."""
        rows = scored_positions(len(chunk))
        # float64: the two-pass INT8 path's KL is small enough for float32 rounding to matter.
        p, q = reference[rows].double().log_softmax(-1), logits[rows].double().log_softmax(-1)
        targets = torch.tensor(chunk[rows.start + 1:rows.stop + 1])
        self.kl.append((p.exp() * (p - q)).sum(-1))
        self.same_top.append(p.argmax(-1) == q.argmax(-1))
        self.nll.append(-q.gather(-1, targets[:, None])[:, 0])

    @property
    def positions(self) -> int:
        return sum(len(kl) for kl in self.kl)

    @property
    def mean_kl(self) -> float:
        return torch.cat(self.kl).mean().item()

    @property
    def mean_kl_error(self) -> float:
        """The standard error of `mean_kl`."""
        kl = torch.cat(self.kl)
        return (kl.std() / math.sqrt(len(kl))).item() if len(kl) > 1 else 0.0

    def kl_percentile(self, q: float) -> float:
        """The q-th percentile (0..100) of the per-position KL, by nearest rank."""
        from bench.common import percentile

        return percentile(torch.cat(self.kl).tolist(), q)

    @property
    def same_top_share(self) -> float:
        return torch.cat(self.same_top).double().mean().item()

    @property
    def perplexity(self) -> float:
        return math.exp(torch.cat(self.nll).mean().item())


REFERENCE = "fp32 path (the reference)"
LLAMA_CPP = "llama.cpp on the Q4_1 GGUF"


def measure(reference: PathLogits, paths: dict[str, PathLogits], chunks: list[list[int]]) -> dict[str, Fidelity]:
    """Every path (and the reference itself) scored against `reference`, holding one chunk's logits at a time."""
    results = {label: Fidelity() for label in (REFERENCE, *paths)}
    for index, chunk in enumerate(chunks, 1):
        expected = reference(chunk)
        results[REFERENCE].add(expected, expected, chunk)
        for label, path in paths.items():
            results[label].add(expected, path(chunk), chunk)
        print(f"chunk {index} of {len(chunks)}: " + ", ".join(
            f"{label.split(' (')[0]} {fidelity.mean_kl:.6f}" for label, fidelity in results.items()), flush=True)
    return results


LLAMA_SCRIPT = """
import json, sys
import numpy as np
from llama_cpp import Llama
args = json.load(sys.stdin)
llm = Llama(model_path=args["gguf"], n_ctx=args["context"], n_batch=args["context"], n_ubatch=args["context"],
            n_threads=args["threads"], logits_all=True, verbose=False)
first = args["chunks"][0]
print(json.dumps({"vocab": llm.n_vocab(), "add_bos": llm.metadata.get("tokenizer.ggml.add_bos_token"),
                  "text": llm.detokenize(first).decode("utf-8", "replace")}), flush=True)
for ids in args["chunks"]:
    llm.reset()
    llm.eval(ids)
    sys.stdout.buffer.write(np.ascontiguousarray(llm.scores[:len(ids)], dtype=np.float32).tobytes())
    sys.stdout.buffer.flush()
"""


@contextlib.contextmanager
def llama_cpp_path(python: str, gguf: str, chunks: list[list[int]], threads: int) -> Iterator[tuple[PathLogits, dict]]:
    """(path, what llama.cpp says of the model): llama.cpp's logits for `chunks`, asked for in their order.

    llama-cpp-python runs in its own interpreter, evaluating every chunk from an empty cache with exactly
    our ids (no BOS added) and streaming each chunk's float32 logits back through a pipe as it goes.
    """
    process = subprocess.Popen([python, "-c", LLAMA_SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        request = {"gguf": gguf, "chunks": chunks, "context": max(map(len, chunks)), "threads": threads}
        process.stdin.write(json.dumps(request).encode())
        process.stdin.close()
        model = json.loads(process.stdout.readline() or "null")
        if model is None:
            raise RuntimeError(f"llama-cpp-python failed to load the model (exit status {process.wait()})")
        remaining = iter(chunks)

        def logits(chunk: list[int]) -> torch.Tensor:
            assert chunk == next(remaining), "llama.cpp's chunks are read in the order they were sent"
            size = len(chunk) * model["vocab"] * 4
            data = process.stdout.read(size)
            if len(data) < size:
                raise RuntimeError(f"llama-cpp-python stopped (exit status {process.wait()})")
            return torch.frombuffer(bytearray(data), dtype=torch.float32).view(len(chunk), model["vocab"])

        yield logits, model
    finally:
        process.kill()
        process.wait()


def report(results: dict[str, Fidelity]) -> str:
    """The results as a Markdown table, one row per path, then each mean KL as a multiple of llama.cpp's."""
    baseline = results[REFERENCE].perplexity
    rows = ["| path | mean KL from fp32 (nats) | 99th percentile KL | same top token as fp32 | perplexity |",
            "|---|---|---|---|---|"]
    for label, f in results.items():
        change = f"{100 * (f.perplexity / baseline - 1):+.2f}%"
        rows.append(f"| {label} | {f.mean_kl:.3g} ± {f.mean_kl_error:.2g} | {f.kl_percentile(99):.3g} | "
                    f"{100 * f.same_top_share:.2f}% | {f.perplexity:.3f} ({change}) |")
    if LLAMA_CPP in results:
        anchor, others = results[LLAMA_CPP].mean_kl, [label for label in results if label not in (REFERENCE, LLAMA_CPP)]
        rows.append("\nMean KL as a multiple of llama.cpp's: "
                    + "; ".join(f"{label}: {results[label].mean_kl / anchor:.3g}x" for label in others))
    return "\n".join(rows)


def method(chunks: list[list[int]], llama: dict | None) -> str:
    """What was measured and how, for BENCHMARKS.md."""
    from workers.engine.int8.gemm import ACTIVATION_LEVELS

    scored = sum(len(range(len(c))[scored_positions(len(c))]) for c in chunks)
    text = (f"{len(chunks)} chunks of {CONTEXT} tokens ({len(chunks) * CONTEXT} tokens of the pydoc topics "
            f"{', '.join(TEXT_TOPICS)}), each evaluated in one pass from an empty cache; as llama.cpp's perplexity "
            f"tool does, only each chunk's second half is scored: {scored} positions. KL is KL(fp32 || path) of "
            "the next-token distributions, in nats, its mean given with its standard error. fp32 = "
            '`CUDADecoder(device="cpu")` on the weights dequantized from the Q4_1 GGUF; INT8 = `INT8Decoder` '
            f"(SmoothQuant alpha 0.5, per-channel INT8 weights, per-row "
            f"{'8' if ACTIVATION_LEVELS == 127 else '7'}-bit activation codes); bf16 = the same fp32-path code "
            "with weights, activations and KV cache in bf16, on the CPU (the GPU pool's dtype; CUDA's kernels "
            "round differently).")
    if llama:
        text += (" llama.cpp = llama-cpp-python with `logits_all`, on the Q4_1 GGUF itself (the same weights as "
                 "the fp32 reference, before dequantization; it multiplies them with 8-bit activations), fed "
                 f"exactly our token ids, no BOS added (the GGUF's add_bos_token: {llama['add_bos']}); its "
                 f"vocabulary ({llama['vocab']}) and its text of the first chunk match ours.")
    return text


def cpu_bf16(settings):
    """The fp32 path's code with weights, activations and KV cache in bf16, on the CPU."""
    from workers.gpu.decoder import CUDADecoder

    return CUDADecoder(device="cpu", dtype="bfloat16", max_batch_size=1, max_seq_len=CONTEXT).load_weights(
        settings.model_path)


def our_paths(settings) -> dict[str, PathLogits]:
    """This project's paths other than the reference: both INT8 forms as CPU workers load them, and bf16."""
    from workers.cpu.decoder import INT8Decoder

    decoders = {f"INT8, {'two passes (INT8_RESIDUAL=1)' if residual else 'one pass (the default)'}":
                INT8Decoder.from_settings(settings, residual=residual, max_batch_size=1, max_seq_len=CONTEXT,
                                          compile_decode=False)  # prefill only: the decode step is not used
                for residual in (False, True)}
    decoders["bf16 model, on the CPU"] = cpu_bf16(settings)
    return {label: lambda ids, d=decoder: position_logits(d, ids) for label, decoder in decoders.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-python", help="a Python with llama-cpp-python, to add llama.cpp's own logits")
    parser.add_argument("--chunks", type=int, default=CHUNKS, help=f"chunks of {CONTEXT} tokens (default {CHUNKS})")
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = parser.parse_args()
    from bench.common import machine, write_section
    from bench.service import gguf_model
    from shared.model_files import force_offline
    from shared.settings import Settings
    from shared.tokenizer import load_tokenizer
    from workers.gpu.decoder import CUDADecoder

    force_offline()
    settings = Settings.from_env()
    tokenizer = load_tokenizer(settings.model_dir)
    chunks = text_chunks(tokenizer, args.chunks)
    fp32 = CUDADecoder(device="cpu", max_batch_size=1, max_seq_len=CONTEXT).load_weights(settings.model_path)
    paths = our_paths(settings)
    with contextlib.ExitStack() as stack:
        llama = None
        if args.llama_python:
            path, llama = stack.enter_context(
                llama_cpp_path(args.llama_python, str(gguf_model()), chunks, torch.get_num_threads()))
            check_llama_cpp(llama, tokenizer, chunks[0], fp32.config.vocab_size)
            paths[LLAMA_CPP] = path
        results = measure(lambda ids: position_logits(fp32, ids), paths, chunks)
    table = report(results)
    print(table)
    if args.write:
        command = ("python -m bench.int8_quality" + (" --llama-python PATH" if llama else "")
                   + (f" --chunks {args.chunks}" if args.chunks != CHUNKS else ""))
        write_section("INT8 fidelity (KL divergence from the fp32 path)",
                      f"Machine: {machine()}. One run of `{command}`: {method(chunks, llama)}\n\n{table}")


def check_llama_cpp(llama: dict, tokenizer, chunk: list[int], vocab: int) -> None:
    """Fail unless llama.cpp reads our ids as our tokenizer does: same vocabulary size, same text."""
    if llama["vocab"] != vocab:
        raise RuntimeError(f"llama.cpp's vocabulary has {llama['vocab']} tokens, ours {vocab}")
    if llama["text"] != tokenizer.decode(chunk, skip_special_tokens=False):
        raise RuntimeError("llama.cpp decodes our token ids to a different text")


if __name__ == "__main__":
    main()
