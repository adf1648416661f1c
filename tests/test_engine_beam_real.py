"""Beam search and scoring as rows of the batch on SmolLM2: transformers' beams on the fp32 path, and on the
compiled INT8 decoder that CPU workers run, a beam of width 1 is greedy decoding token for token."""

from __future__ import annotations

import pytest

from tests.engine_helpers import BEAM_CHAT as CHAT
from tests.engine_helpers import BEAM_RAW as RAW
from tests.engine_helpers import (
    REAL_NEW_TOKENS,
    REAL_WEIGHTS,
    assert_same_beams,
    beam_search,
    greedy,
    hf_beams,
    score_candidates,
)
from tests.engine_helpers import load_transformers as load_hf

pytest_plugins = ["tests.engine_fixtures"]
pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def real_hf():
    """transformers' own SmolLM2 in fp32."""
    return load_hf(REAL_WEIGHTS)


@pytest.mark.parametrize("prompt_kind", ["chat", "raw"])
def test_smollm2_beams_match_transformers(real_fp32, real_hf, real_tokenizer, prompt_kind):
    prompt = real_tokenizer.encode_chat(CHAT) if prompt_kind == "chat" else real_tokenizer.encode(RAW)
    eos = real_tokenizer.eos_token_ids
    ours = beam_search(real_fp32, real_tokenizer, prompt, 4, 24, 1.0, eos)
    assert_same_beams(ours, hf_beams(real_hf, prompt, 4, 24, eos))
    [best] = beam_search(real_fp32, real_tokenizer, prompt, 1, 24, 1.0, eos)
    assert best.token_ids == greedy(real_fp32, real_tokenizer, [prompt], 24)[0]
    scores = score_candidates(real_fp32, real_tokenizer, prompt, [c.token_ids for c in ours])
    assert scores == pytest.approx([c.score for c in ours], abs=1e-4)


def test_a_beam_of_width_one_is_greedy_on_the_compiled_int8_decoder(real_int8_compiled, real_tokenizer, real_prompts):
    # Before beams were batch rows they were decoded eagerly on a cache of their own, and parted from the
    # compiled greedy answer where INT8's rounding differs: at the 9th token of the haiku, the 23rd of recursion.
    eos = real_tokenizer.eos_token_ids
    for index, prompt in enumerate(real_prompts[:3]):  # the chat prompts, each beside the others
        expected = greedy(real_int8_compiled, real_tokenizer, [prompt], REAL_NEW_TOKENS)[0]
        others = [p for i, p in enumerate(real_prompts) if i != index]
        [best] = beam_search(real_int8_compiled, real_tokenizer, prompt, 1, REAL_NEW_TOKENS, 1.0, eos, beside=others,
                             max_tokens=16)
        assert best.token_ids == expected, index


def test_smollm2_compiled_int8_beam_search(real_int8_compiled, real_tokenizer):
    candidates = beam_search(real_int8_compiled, real_tokenizer, real_tokenizer.encode_chat(CHAT), 4, 24, 1.0,
                             real_tokenizer.eos_token_ids)
    assert len(candidates) == 4 and len({tuple(c.token_ids) for c in candidates}) == 4
    assert "Paris" in real_tokenizer.decode(candidates[0].token_ids)
