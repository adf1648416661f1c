"""The steps of `python -m bench.gpu_check`: each takes the run's `Target`, returns report lines, and raises
`CheckFailed` (or anything else) when the GPU pool would not work as the settings promise."""

from __future__ import annotations

import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.agreement import confident_agreement, perplexity, top1_agreement
from bench.int8_quality import position_logits
from shared.model_files import read_config
from shared.sampling import SamplingParams
from shared.tokenizer import TextTokenizer
from workers.engine.attention import causal_mask
from workers.engine.engine import Engine
from workers.engine.llama import LlamaConfig
from workers.engine.sampler import SamplingState, sample
from workers.engine.sequence import Sequence
from workers.gpu.decoder import CUDADecoder
from workers.gpu.device import kv_bytes_per_position, native_bf16
from workers.gpu.paged_cache import BLOCK

PROMPT = "Write a short story about a robot who learns to paint."

AGREEMENT_BOUNDS = {"tiny": 0.9, "model": 0.95}
"""Least top-1 agreement of the half-precision decoder with fp32 (tests/test_gpu_precision.py's bounds)."""


class CheckFailed(Exception):
    """A step's finding that fails the check (its message says what and by how much)."""


@dataclass
class Target:
    """Where the check runs and on what: the device, the half-precision dtype, the model folders, the sizes."""

    device: torch.device
    half: torch.dtype
    models: dict[str, Path]  # label -> prepared folder: "tiny", and "model" (MODEL_DIR) when it is there
    batches: tuple[int, ...]
    tokens: int
    max_batch_size: int
    max_seq_len: int
    max_tokens_in_flight: int
    loaded: dict[str, CUDADecoder] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def main_model(self) -> tuple[str, Path]:
        """The real model when there is one, else the tiny one."""
        label = "model" if "model" in self.models else "tiny"
        return label, self.models[label]

    def decoder(self, folder: Path, dtype: torch.dtype, **limits) -> CUDADecoder:
        """The GPU decoder on the check's device."""
        options = {"max_batch_size": 1, "max_seq_len": 1024, **limits}
        return CUDADecoder(device=str(self.device), dtype=str(dtype).removeprefix("torch."), **options).load_weights(
            folder)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


def environment(target: Target) -> list[str]:
    """Versions, the GPU and what it computes in."""
    import transformers

    lines = [f"torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}), "
             f"transformers {transformers.__version__}, Python {platform.python_version()}"]
    if target.cuda:
        props = torch.cuda.get_device_properties(target.device)
        lines.append(f"{target.device}: {props.name}, compute capability {props.major}.{props.minor}, "
                     f"{props.total_memory / 2**30:.1f} GiB, {props.multi_processor_count} SMs, bf16 native: "
                     f"{native_bf16(target.device)}; {torch.cuda.device_count()} GPU(s) visible")
    else:
        lines.append(f"CPU dry run: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    lines.append(f"half-precision dtype: {target.half}")
    return lines


SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
"""torch's SDPA kernels, in the order its dispatcher tries them."""


def sdpa_cases(config: LlamaConfig, device, dtype) -> dict[str, tuple]:
    """(q, k, v, mask) of the decoder's attention calls, at the loaded model's head shapes."""
    heads, kv, dim = config.num_heads, config.num_kv_heads, config.head_dim

    def tensors(batch, queries, keys):
        return (torch.randn(batch, heads, queries, dim, device=device, dtype=dtype),
                *(torch.randn(batch, kv, keys, dim, device=device, dtype=dtype) for _ in range(2)))

    visible = torch.arange(512, device=device)[None, :] <= torch.randint(0, 512, (32, 1), device=device)
    decode_mask = torch.zeros(visible.shape, device=device, dtype=dtype).masked_fill_(~visible, -torch.inf)
    return {
        "prefill chunk 256": (*tensors(1, 256, 256), causal_mask([0], 256, device, dtype)),
        "padded prefill 4x64": (*tensors(4, 64, 64), causal_mask([0] * 4, 64, device, dtype)),
        "chunk after 192 cached": (*tensors(1, 64, 256), causal_mask([192], 64, device, dtype)),
        "decode step 32x512 (graph bucket)": (*tensors(32, 1, 512), decode_mask[:, None, None, :]),
    }


def sdpa_probe(target: Target) -> list[str]:
    """Which SDPA kernels take the decoder's real masks and cache shapes, and which one torch picks."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    config = LlamaConfig.from_dict(read_config(target.main_model[1]))
    lines, unusable = [], []
    for name, (q, k, v, mask) in sdpa_cases(config, target.device, target.half).items():
        accepted = []
        for backend in SDPA_BACKENDS:
            try:
                with sdpa_kernel([getattr(SDPBackend, backend)]):
                    F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
                accepted.append(backend.lower())
            except RuntimeError:
                continue
        lines.append(f"{name}: {chosen_kernel(q, k, v, mask)}; kernels that accept it: {', '.join(accepted) or 'none'}")
        if not accepted:
            unusable.append(name)
    if unusable:
        raise CheckFailed(f"no SDPA kernel takes {', '.join(unusable)}:\n" + "\n".join(lines))
    return lines


def chosen_kernel(q, k, v, mask) -> str:
    """The kernel torch's dispatcher picks for these inputs (its private chooser; 'unknown' if it moved)."""
    from torch.nn.attention import SDPBackend

    try:
        choice = torch._fused_sdp_choice(q, k, v, mask, 0.0, False, enable_gqa=True)
        return f"torch picks {SDPBackend(choice).name.lower()}"
    except (AttributeError, RuntimeError, TypeError, ValueError) as exc:
        return f"torch's pick unknown ({type(exc).__name__})"


def device_sampling(target: Target) -> list[str]:
    """The sampler on the device: one host transfer per call, and a seeded row's draws independent of its batch."""
    vocab = LlamaConfig.from_dict(read_config(target.main_model[1])).vocab_size
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, top_k=40, top_p=0.9, seed=1,
                                                                repetition_penalty=1.2)] * 4
    states = [SamplingState(p, [1, 2, 3]) for p in params]
    logits = torch.randn(8, vocab, device=target.device) * 3
    alone = SamplingState(params[1], [1, 2, 3])
    syncs = count_syncs(target, lambda: sample(logits, states))
    lines = [f"8 rows of {vocab} logits: {syncs} synchronising call(s) per sample()" if target.cuda
             else "8 rows sampled on the CPU"]
    together = sample(logits, [SamplingState(p, [1, 2, 3]) for p in params])[1]
    if together != sample(logits[1:2], [alone])[0]:
        raise CheckFailed("a seeded row drew another token in a batch than alone")
    if syncs > 2:
        raise CheckFailed(f"sample() synchronised with the device {syncs} times (expected 1: the sampled ids)")
    return lines


def count_syncs(target: Target, work) -> int:
    """How many times `work()` made the host wait for the device (0 without CUDA)."""
    import warnings

    if not target.cuda:
        work()
        return 0
    torch.cuda.synchronize(target.device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            work()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(warning.message) for warning in caught)


def precision(target: Target) -> list[str]:
    """The half-precision decoder against fp32 on the same device: top-1 agreement and perplexity."""
    import pydoc_data.topics

    text = "\n".join(pydoc_data.topics.topics[name] for name in ("assert", "if", "pass", "del", "return"))
    lines, low = [], []
    for label, folder in target.models.items():
        ids = TextTokenizer(folder).encode(text)[: 512 if label == "model" else 240]
        logits = {dtype: position_logits(target.decoder(folder, dtype), ids)
                  for dtype in (torch.float32, target.half)}
        half, fp32 = logits[target.half], logits[torch.float32]
        if not half.isfinite().all():
            raise CheckFailed(f"{label}: {target.half} logits hold NaN or inf")
        agreement = top1_agreement(half, fp32)
        confident = confident_agreement(half, fp32)
        lines.append(f"{label}: top-1 agreement {agreement:.3f} over {len(ids)} positions (bound "
                     f"{AGREEMENT_BOUNDS[label]})" + ("" if math.isnan(confident) else
                                                      f", {confident:.3f} where fp32 has p >= 0.5")
                     + f"; perplexity fp32 {perplexity(fp32, ids):.3f}, {target.half} {perplexity(half, ids):.3f}")
        if agreement <= AGREEMENT_BOUNDS[label]:
            low.append(label)
    if low:
        raise CheckFailed("agreement below its bound:\n" + "\n".join(lines))
    return lines


def memory(target: Target) -> list[str]:
    """Load the main model as a worker would; the KV cache must be MAX_TOKENS_IN_FLIGHT's size (or what fits)."""
    label, folder = target.main_model
    before = torch.cuda.memory_allocated(target.device) if target.cuda else 0
    if target.cuda:
        torch.cuda.reset_peak_memory_stats(target.device)
    decoder = target.decoder(folder, target.half, max_batch_size=target.max_batch_size,
                             max_seq_len=target.max_seq_len, max_tokens_in_flight=target.max_tokens_in_flight,
                             compile_decode=True)
    target.loaded[label] = decoder
    weights = sum(p.numel() * p.element_size() for p in decoder.model.parameters())
    per_position = kv_bytes_per_position(decoder.config, decoder.dtype)
    expected = (1 + math.ceil(decoder.token_capacity / BLOCK) + decoder.max_batch_size) * BLOCK * per_position
    step = "eager (capture failed: see the log)"
    if decoder.static is not None:
        step = f"{decoder.static.captured} CUDA graphs" if target.cuda else "bucketed, eager (no CUDA)"
    lines = [f"{label} weights {weights / 2**20:.1f} MiB; KV cache {decoder.cache.nbytes / 2**20:.1f} MiB for "
             f"{decoder.token_capacity} positions (MAX_TOKENS_IN_FLIGHT {target.max_tokens_in_flight}); decode step: "
             + step]
    if decoder.cache.nbytes != expected:
        raise CheckFailed(f"the KV cache takes {decoder.cache.nbytes} bytes, not the {expected} its size implies")
    if target.cuda:
        after = torch.cuda.memory_allocated(target.device) - before
        peak = torch.cuda.max_memory_allocated(target.device)
        lines.append(f"allocated after loading {after / 2**20:.0f} MiB (weights + cache + graphs), peak "
                     f"{(peak - before) / 2**20:.0f} MiB")
        if peak - before > 1.25 * (weights + decoder.cache.nbytes) + 512 * 2**20:
            raise CheckFailed("loading peaked far above weights + cache: a second copy of the weights?\n" + lines[-1])
    return lines


def throughput(target: Target) -> list[str]:
    """Decode tokens/s of our engine beside transformers' generate() (same dtype, static cache, same device)."""
    from transformers import AutoModelForCausalLM

    label, folder = target.main_model
    decoder = target.loaded[label]
    tokenizer = TextTokenizer(folder)
    prompt = tokenizer.encode_chat([{"role": "user", "content": PROMPT}])
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=target.half).to(target.device).eval()
    lines = []
    for batch in target.batches:
        ours = decode_rate(target, batch, lambda n, b=batch: run_ours(decoder, tokenizer, prompt, b, n))
        theirs = decode_rate(target, batch, lambda n, b=batch: run_generate(reference, prompt, b, n, target.device))
        lines.append(f"batch {batch:3d}: ours {ours:8.1f} tok/s, transformers generate (static cache) {theirs:8.1f} "
                     f"tok/s ({ours / theirs:.2f}x)")
    return lines


def decode_rate(target: Target, batch: int, run) -> float:
    """batch x (tokens - 1) / (time for all tokens - time for one): prompt processing counts for nothing."""
    run(2)  # warm-up
    times = {}
    for tokens in (1, target.tokens):
        start = time.perf_counter()
        run(tokens)
        target.sync()
        times[tokens] = time.perf_counter() - start
    return batch * (target.tokens - 1) / max(times[target.tokens] - times[1], 1e-9)


def run_ours(decoder: CUDADecoder, tokenizer: TextTokenizer, prompt: list[int], batch: int, tokens: int) -> None:
    engine = Engine(decoder, tokenizer.backend, eos_token_ids=[])
    params = SamplingParams(max_tokens=tokens, temperature=0.0)
    engine.run([Sequence(str(i), prompt, params, tokenizer.backend) for i in range(batch)])


def run_generate(model, prompt: list[int], batch: int, tokens: int, device) -> None:
    inputs = torch.tensor([prompt] * batch, device=device)
    with torch.inference_mode():
        model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=tokens, min_new_tokens=tokens,
                       do_sample=False, cache_implementation="static", pad_token_id=0)
