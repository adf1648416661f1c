"""The GPU decoder in bf16 (and fp16) against itself in fp32, on the CPU: tiny models of both attention shapes
(GQA and MHA) and, under the `model` marker, the real SmolLM2.

The bounds sit below what was measured (BENCHMARKS.md, "bf16 quality (vs the fp32 path)", and the bf16 row of
"INT8 fidelity (KL divergence from the fp32 path)").
"""

from __future__ import annotations

import pydoc_data.topics
from pathlib import Path

import pytest
import torch

from bench.agreement import confident_agreement, perplexity, top1_agreement
from bench.int8_quality import position_logits, text_chunks
from shared.exceptions import ConfigurationError
from shared.tokenizer import TextTokenizer
from tests.engine_helpers import REAL_WEIGHTS, greedy_alone, tiny_prompts
from tests.tiny_model import prepare_tiny
from workers.gpu.decoder import CUDADecoder

pytest_plugins = ["tests.engine_fixtures"]

TINY_BOUNDS = {"bfloat16": 0.9, "float16": 0.97}
"""Least top-1 agreement with fp32 over 240 positions of a tiny model (the measured range: BENCHMARKS.md)."""


def load(folder: Path, dtype: str = "auto", **limits) -> CUDADecoder:
    """The GPU decoder on the CPU in `dtype` (`auto` is fp32 there)."""
    options = {"max_batch_size": 8, "max_seq_len": 256, **limits}
    return CUDADecoder(device="cpu", dtype=dtype, **options).load_weights(folder)


def text_ids(folder: Path) -> list[int]:
    """240 tokens of English prose and code (the tiny tokenizer's)."""
    text = "\n".join(pydoc_data.topics.topics[name] for name in ("assert", "if", "pass"))
    return TextTokenizer(folder).encode(text)[:240]


@pytest.fixture(scope="module", params=["gqa", "mha"])
def tiny_shape(request, tiny_dir, tmp_path_factory) -> Path:
    """The session's tiny model (4 query heads over 2 KV heads), then one with a KV head per query head."""
    if request.param == "gqa":
        return tiny_dir
    return prepare_tiny(tmp_path_factory, "tiny-mha", num_key_value_heads=4)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_picks_fp32s_next_token_on_tiny_models(tiny_shape, dtype):
    half = load(tiny_shape, dtype)
    assert half.model.lm_head.weight.dtype == half.cache.keys[0].dtype == getattr(torch, dtype)
    ids = text_ids(tiny_shape)
    reference, logits = position_logits(load(tiny_shape), ids), position_logits(half, ids)
    assert logits.isfinite().all()
    assert top1_agreement(logits, reference) > TINY_BOUNDS[dtype]


def decode_picks(decoder: CUDADecoder, prompts: list[list[int]], answers: list[list[int]]) -> list[list[int]]:
    """Each row's greedy pick at every step of its answer, fed back token by token through batched decode()."""
    first = decoder.prefill_many(0, prompts)
    picks = [[int(row.argmax())] for row in first]
    for step in range(min(len(a) for a in answers) - 1):
        logits = decoder.decode([a[step] for a in answers], [len(p) + step for p in prompts])
        assert logits.isfinite().all()
        for row, pick in zip(picks, logits.argmax(-1).tolist()):
            row.append(pick)
    return picks


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "bucketed"])
def test_bf16_batched_decode_follows_fp32s_greedy_answers(tiny_shape, tiny_tokenizer, compiled):
    # Prompts of different lengths decode together (masks, padding, the paged cache) in bf16.
    prompts = tiny_prompts(tiny_tokenizer)
    answers = greedy_alone(load(tiny_shape), tiny_tokenizer, prompts, 16, eos_token_ids=[])
    picks = decode_picks(load(tiny_shape, "bfloat16", compile_decode=compiled), prompts, answers)
    same = sum(p == a for row, answer in zip(picks, answers) for p, a in zip(row, answer))
    assert same / sum(len(row) for row in picks) > TINY_BOUNDS["bfloat16"]


@pytest.mark.parametrize("dtype", ["fp8", "bf16", "half", ""])
def test_an_unknown_dtype_is_refused_naming_worker_dtype(tiny_dir, dtype):
    with pytest.raises(ConfigurationError, match="WORKER_DTYPE"):
        load(tiny_dir, dtype)


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_a_cuda_device_without_cuda_is_refused_naming_worker_device(device):
    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    with pytest.raises(ConfigurationError, match=f"WORKER_DEVICE={device}.*WORKER_DEVICE=cpu"):
        CUDADecoder(device=device)


# -- the real SmolLM2 ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_text_logits(real_fp32, real_tokenizer) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    ids = text_chunks(real_tokenizer, 1)[0]  # 512 tokens of the fixed text
    bf16 = load(REAL_WEIGHTS, "bfloat16", max_seq_len=1024)
    return ids, position_logits(real_fp32, ids), position_logits(bf16, ids)


@pytest.mark.model
def test_real_bf16_stays_with_fp32_on_the_fixed_text(real_text_logits):
    ids, fp32, bf16 = real_text_logits
    assert bf16.isfinite().all()
    assert perplexity(bf16, ids) / perplexity(fp32, ids) < 1.01
    assert top1_agreement(bf16, fp32) > 0.95
    assert confident_agreement(bf16, fp32) > 0.99  # where fp32 gives its token p >= 0.5


@pytest.mark.model
def test_real_bf16_batched_decode_follows_fp32s_greedy_answers(real_prompts, real_fp32_alone):
    answers = [result.ids[:24] for result in real_fp32_alone]
    picks = decode_picks(load(REAL_WEIGHTS, "bfloat16", max_seq_len=1024), real_prompts, answers)
    same = sum(p == a for row, answer in zip(picks, answers) for p, a in zip(row, answer))
    assert same / sum(len(row) for row in picks) > 0.95  # fed fp32's answers: bf16's pick at each step
