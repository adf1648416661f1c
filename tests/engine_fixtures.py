"""Engine test fixtures, registered by each `test_engine_*` module through `pytest_plugins`.

The tiny model is prepared once per session; the real SmolLM2 decoders are loaded once per session, and
transformers' reference outputs for the real prompts are computed once.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shared.sampling import SamplingParams
from shared.tokenizer import TextTokenizer
from tests.engine_helpers import (
    REAL_CHAT,
    REAL_NEW_TOKENS,
    REAL_RAW,
    REAL_WEIGHTS,
    Result,
    load_fp32,
    load_int8,
    load_transformers,
    run_engine,
    transformers_greedy,
)
from workers.cpu.decoder import INT8Decoder
from workers.engine.decoder import Decoder
from workers.gpu.decoder import CUDADecoder

# -- the tiny model --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_dir(tiny_weights) -> Path:
    """The session's prepared tiny model (tests/tiny_model.py), under the engine tests' name for it."""
    return tiny_weights


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_dir) -> TextTokenizer:
    """The tiny tokenizer, read from the prepared tiny folder."""
    return TextTokenizer(tiny_dir)


@pytest.fixture(scope="session")
def tiny_fp32(tiny_dir) -> CUDADecoder:
    """The tiny model on the fp32 path (8 slots)."""
    return load_fp32(tiny_dir)


@pytest.fixture(scope="session")
def tiny_int8(tiny_dir) -> INT8Decoder:
    """The tiny model on the INT8 decoder (8 slots)."""
    return load_int8(tiny_dir)


@pytest.fixture(scope="session")
def tiny_int8_compiled(tiny_dir) -> INT8Decoder:
    """The tiny model on the INT8 decoder with its decode step compiled, as CPU workers run it.

    Compiled on one thread, as the tiny-model modules run it (see one_thread): the thread count is part
    of what a compiled graph assumes.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        decoder = load_int8(tiny_dir, compile_decode=True)
    finally:
        torch.set_num_threads(previous)
    assert decoder.decode_is_compiled
    return decoder


@pytest.fixture(scope="session", params=["fp32", "int8", "int8-compiled"])
def tiny_decoder(request, tiny_fp32, tiny_int8, tiny_int8_compiled) -> Decoder:
    """Each decoder in turn."""
    return {"fp32": tiny_fp32, "int8": tiny_int8, "int8-compiled": tiny_int8_compiled}[request.param]


@pytest.fixture(scope="session")
def tiny_hf(tiny_dir):
    """transformers' own model of the tiny checkpoint: the reference."""
    return load_transformers(tiny_dir)


# -- the real SmolLM2 ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def real_tokenizer() -> TextTokenizer:
    """SmolLM2's tokenizer and chat template."""
    return TextTokenizer(REAL_WEIGHTS)


@pytest.fixture(scope="session")
def real_prompts(real_tokenizer) -> list[list[int]]:
    """Three chat-templated prompts, then three raw ones (6 to 38 tokens)."""
    chat = [real_tokenizer.encode_chat([{"role": "user", "content": text}]) for text in REAL_CHAT]
    return chat + [real_tokenizer.encode(text) for text in REAL_RAW]


@pytest.fixture(scope="session")
def real_fp32() -> CUDADecoder:
    """SmolLM2 on the fp32 path, loaded once per session."""
    return load_fp32(REAL_WEIGHTS, max_batch_size=8, max_seq_len=1024)


@pytest.fixture(scope="session")
def real_int8() -> INT8Decoder:
    """SmolLM2 on the INT8 decoder, loaded once per session."""
    return load_int8(REAL_WEIGHTS, max_batch_size=8, max_seq_len=1024)


@pytest.fixture(scope="session")
def real_int8_residual() -> INT8Decoder:
    """SmolLM2 on the INT8 decoder in its two-pass (residual) form, loaded once per session."""
    return load_int8(REAL_WEIGHTS, max_batch_size=8, max_seq_len=1024, residual=True)


@pytest.fixture(scope="session")
def real_int8_compiled() -> INT8Decoder:
    """SmolLM2 on the INT8 decoder with its decode step compiled, loaded once per session."""
    return load_int8(REAL_WEIGHTS, max_batch_size=8, max_seq_len=1024, compile_decode=True)


@pytest.fixture(scope="session")
def real_transformers_greedy(real_tokenizer, real_prompts) -> list[list[int]]:
    """transformers' greedy outputs of the real prompts (the model is freed afterwards)."""
    model = load_transformers(REAL_WEIGHTS)
    eos = real_tokenizer.eos_token_ids
    return [transformers_greedy(model, ids, REAL_NEW_TOKENS, eos) for ids in real_prompts]


@pytest.fixture(scope="session")
def real_fp32_alone(real_fp32, real_tokenizer, real_prompts) -> list[Result]:
    """Our fp32 path's greedy run of each real prompt on its own, with its text deltas."""
    params = SamplingParams(max_tokens=REAL_NEW_TOKENS, temperature=0.0)
    return [run_engine(real_fp32, real_tokenizer, [ids], params)[0] for ids in real_prompts]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny-model modules run torch on one thread: their ops are too small to split, and on a busy 2-core
    machine every parallel region waits for a descheduled second thread (INT8 steps ran many times slower)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
