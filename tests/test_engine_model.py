"""Our Llama against transformers' on tiny random checkpoints: logits, greedy tokens, layouts, chunked prefill."""

from __future__ import annotations

import pytest
import torch

from shared.tokenizer import TextTokenizer
from tests.engine_helpers import (
    TINY_PROMPTS,
    greedy,
    load_fp32,
    load_transformers,
    tiny_prompts,
    transformers_greedy,
)
from tests.tiny_model import prepare_tiny

pytest_plugins = ["tests.engine_fixtures"]
pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT_INDEXES = range(len(TINY_PROMPTS) + 1)  # the raw prompts and the chat one


def test_logits_at_every_position_match_transformers(tiny_fp32, tiny_hf, tiny_tokenizer):
    ids = tiny_tokenizer.encode("The quick brown fox jumps over the lazy dog. Ünïcödé 😀 text, too.")
    ours = tiny_fp32.model(torch.tensor([ids]), tiny_fp32.cache, slice(0, 1), [0], last_only=False)[0]
    with torch.inference_mode():
        theirs = tiny_hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("index", PROMPT_INDEXES)
def test_fp32_greedy_matches_transformers_generate(index, tiny_fp32, tiny_hf, tiny_tokenizer):
    prompt = tiny_prompts(tiny_tokenizer)[index]
    expected = transformers_greedy(tiny_hf, prompt, 32, tiny_tokenizer.eos_token_ids)
    assert greedy(tiny_fp32, tiny_tokenizer, [prompt], 32) == [expected]


LAYOUTS = {
    "untied-mha": {"tie_word_embeddings": False, "num_key_value_heads": 4},
    "head-dim-32": {"head_dim": 32, "num_key_value_heads": 1},
    "llama3-rope": {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 16}},
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_other_llama_checkpoints_prepare_and_match_transformers(layout, tmp_path_factory):
    folder = prepare_tiny(tmp_path_factory, layout, seed=1, **LAYOUTS[layout])
    tokenizer = TextTokenizer(folder)
    decoder, reference = load_fp32(folder), load_transformers(folder)
    prompts = tiny_prompts(tokenizer)[:3]
    expected = [transformers_greedy(reference, ids, 24, tokenizer.eos_token_ids) for ids in prompts]
    assert greedy(decoder, tokenizer, prompts, 24) == expected


@pytest.mark.parametrize("chunk", [1, 4, 6])
def test_chunked_prefill_gives_the_same_tokens(chunk, tiny_decoder, tiny_tokenizer):
    prompt = tiny_tokenizer.encode(
        "A prompt long enough to need several prefill chunks: the quick brown fox jumps over the lazy dog.")
    assert len(prompt) > 2 * chunk  # several chunks, the last one partial for 4 and 6
    whole = greedy(tiny_decoder, tiny_tokenizer, [prompt], 16, eos_token_ids=[])
    assert greedy(tiny_decoder, tiny_tokenizer, [prompt], 16, eos_token_ids=[], prefill_chunk=chunk) == whole
