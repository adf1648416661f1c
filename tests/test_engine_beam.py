"""Beam search and candidate scoring as rows of the engine's batch, against transformers' `generate(num_beams=...)`,
greedy decoding, and the private-cache implementation they replaced (tests/beam_reference.py). Tiny model; the
same checks on SmolLM2 are in test_engine_beam_real.py."""

from __future__ import annotations

import pytest
import torch

from shared.exceptions import ContextLengthError
from tests.beam_reference import reference_beam_search, reference_scores
from tests.engine_helpers import BEAM_CHAT as CHAT
from tests.engine_helpers import BEAM_RAW as RAW
from tests.engine_helpers import assert_same_beams, beam_group, beam_search, greedy, hf_beams, score_candidates
from workers.features.beam import BeamSearch
from workers.features.scoring import ScoreGroup

pytest_plugins = ["tests.engine_fixtures"]
pytestmark = pytest.mark.usefixtures("one_thread")

BESIDE = ("The history of the Roman Empire", "def f(x):\n    return x * 2", "a")
"""Prompts decoded greedily in the same batch as a beam search or scoring job."""


def runner_up_endings(decoder, prompt: list[int], length_penalty: float = 1.0) -> list[int]:
    """EOS ids drawn from the runner-up endings of an EOS-free search, so that hypotheses finish at different
    lengths: the merge, the length penalty and the early-stop heuristic all come into play."""
    free = reference_beam_search(decoder, prompt, BeamSearch(4, 12, length_penalty))
    return sorted({free[1].token_ids[-1], free[2].token_ids[-1]})


@pytest.fixture(scope="module")
def beside(tiny_tokenizer) -> list[list[int]]:
    return [tiny_tokenizer.encode(text) for text in BESIDE]


@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("length_penalty", [1.0, 0.0, -0.5, 2.0])
def test_tiny_beams_match_transformers(tiny_fp32, tiny_hf, tiny_tokenizer, width, length_penalty):
    prompt = tiny_tokenizer.encode(RAW)
    eos = runner_up_endings(tiny_fp32, prompt, length_penalty)
    ours = beam_search(tiny_fp32, tiny_tokenizer, prompt, width, 12, length_penalty, eos)
    assert_same_beams(ours, hf_beams(tiny_hf, prompt, width, 12, eos, length_penalty))
    assert len(ours) == width and (width < 4 or any(c.ended_with_eos for c in ours))


@pytest.mark.parametrize("eos_kind", ["one", "three"])
def test_tiny_chat_beams_match_transformers(tiny_fp32, tiny_hf, tiny_tokenizer, eos_kind):
    prompt = tiny_tokenizer.encode_chat(CHAT)
    # Three EOS ids keep 4 * 4 candidates a step instead of 2 * 4.
    eos = tiny_tokenizer.eos_token_ids
    if eos_kind == "three":
        eos = sorted({*eos, *greedy(tiny_fp32, tiny_tokenizer, [prompt], 6, eos_token_ids=[])[0][3:5]})
    ours = beam_search(tiny_fp32, tiny_tokenizer, prompt, 4, 10, 1.0, eos)
    assert_same_beams(ours, hf_beams(tiny_hf, prompt, 4, 10, eos))


@pytest.mark.parametrize("decoder_name", ["fp32", "int8"])
@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("length_penalty", [1.0, 0.5])
def test_beams_as_batch_rows_equal_the_private_cache_implementation(tiny_fp32, tiny_int8, tiny_tokenizer, beside,
                                                                   decoder_name, width, length_penalty):
    decoder = {"fp32": tiny_fp32, "int8": tiny_int8}[decoder_name]
    prompt = tiny_tokenizer.encode(RAW)
    eos = runner_up_endings(decoder, prompt, length_penalty)
    expected = reference_beam_search(decoder, prompt, BeamSearch(width, 12, length_penalty, eos))
    for others in ([], beside):  # alone, and forking among sequences that finish and leave mid-search
        ours = beam_search(decoder, tiny_tokenizer, prompt, width, 12, length_penalty, eos, beside=others,
                           max_tokens=7)
        assert [(c.token_ids, c.ended_with_eos) for c in ours] == [(c.token_ids, c.ended_with_eos) for c in expected]
        assert [c.score for c in ours] == pytest.approx([c.score for c in expected], abs=1e-4)


def test_a_beam_of_width_one_is_greedy_decoding_token_for_token(tiny_decoder, tiny_tokenizer, beside):
    # Every decoder, the compiled INT8 one of the CPU workers included: the beam's row goes through the same
    # prefill and decode step as a sequence's, so not even rounding differs.
    prompt = tiny_tokenizer.encode(RAW)
    free = greedy(tiny_decoder, tiny_tokenizer, [prompt], 20, eos_token_ids=[])[0]
    eos = [free[5]]
    expected = greedy(tiny_decoder, tiny_tokenizer, [*beside, prompt], 20, eos_token_ids=eos)[-1]
    for others in ([], beside):
        [best] = beam_search(tiny_decoder, tiny_tokenizer, prompt, 1, 20, 1.0, eos, beside=others)
        assert best.token_ids == expected and best.ended_with_eos
        [whole] = beam_search(tiny_decoder, tiny_tokenizer, prompt, 1, 20, 1.0, [], beside=others)
        assert whole.token_ids == free and not whole.ended_with_eos


def test_scores_equal_beam_scores_and_prefer_greedy(tiny_fp32, tiny_tokenizer, beside):
    prompt = tiny_tokenizer.encode(RAW)
    candidates = [c.token_ids for c in beam_search(tiny_fp32, tiny_tokenizer, prompt, 4, 8, 0.5,
                                                   tiny_tokenizer.eos_token_ids)]
    scores = score_candidates(tiny_fp32, tiny_tokenizer, prompt, candidates, 0.5, beside=beside)
    assert scores == pytest.approx(reference_scores(tiny_fp32, prompt, candidates, 0.5), abs=1e-4)
    beams = beam_search(tiny_fp32, tiny_tokenizer, prompt, 4, 8, 0.5, tiny_tokenizer.eos_token_ids)
    assert scores == pytest.approx([c.score for c in beams], abs=1e-4)
    random_ids = torch.randint(0, tiny_tokenizer.vocab_size, (8,), generator=torch.Generator().manual_seed(0)).tolist()
    greedy_ids = greedy(tiny_fp32, tiny_tokenizer, [prompt], 8, eos_token_ids=[])[0]
    good, bad = score_candidates(tiny_fp32, tiny_tokenizer, prompt, [greedy_ids, random_ids])
    assert good > bad


@pytest.fixture
def passes(tiny_fp32, monkeypatch) -> list[int]:
    """Tokens fed by each forward pass of the tiny fp32 decoder's model (rows x new tokens), as they happen."""
    model = tiny_fp32.model
    forward = model.forward
    seen = []

    def counting(tokens, *args, **kwargs):
        seen.append(tokens.numel())
        return forward(tokens, *args, **kwargs)

    monkeypatch.setattr(model, "forward", counting)
    return seen


def test_a_long_prompt_is_prefilled_a_chunk_per_step_and_the_beams_still_match_transformers(
        tiny_fp32, tiny_hf, tiny_tokenizer, passes):
    prompt = tiny_tokenizer.encode(" ".join([RAW] * 8))  # several chunks of 8
    eos = tiny_tokenizer.eos_token_ids
    ours = beam_search(tiny_fp32, tiny_tokenizer, prompt, 3, 8, 1.0, eos, prefill_chunk=8)
    chunks = -(-len(prompt) // 8)
    assert len(prompt) > 24 and passes[:chunks] == [8] * (chunks - 1) + [len(prompt) - 8 * (chunks - 1)]
    assert passes[chunks:] == [3] * (len(passes) - chunks)  # then one decode step of the three beams a step
    assert_same_beams(ours, hf_beams(tiny_hf, prompt, 3, 8, eos))


def test_scoring_feeds_a_chunk_per_step_and_agrees_with_one_pass(tiny_fp32, tiny_tokenizer, passes):
    prompt = tiny_tokenizer.encode(" ".join([RAW] * 8))
    candidates = [c.token_ids for c in beam_search(tiny_fp32, tiny_tokenizer, prompt, 4, 10, 0.5,
                                                   tiny_tokenizer.eos_token_ids)]
    passes.clear()
    steps = []
    scores = score_candidates(tiny_fp32, tiny_tokenizer, prompt, candidates, 0.5, prefill_chunk=8,
                              after_step=lambda engine, step: steps.append(step))
    assert len(steps) == len(passes) and max(passes) <= 8  # one forward pass a step, a chunk at most
    assert scores == pytest.approx(reference_scores(tiny_fp32, prompt, candidates, 0.5), abs=1e-4)


def test_scoring_single_token_candidates_needs_only_the_prompt(tiny_fp32, tiny_tokenizer, passes):
    prompt = tiny_tokenizer.encode(RAW)
    scores = score_candidates(tiny_fp32, tiny_tokenizer, prompt, [[5], [7], [9]], prefill_chunk=4)
    assert passes == [4] * (len(prompt) // 4) + ([len(prompt) % 4] if len(prompt) % 4 else [])
    assert scores == pytest.approx(reference_scores(tiny_fp32, prompt, [[5], [7], [9]]), abs=1e-4)


def test_bad_arguments(tiny_fp32):
    with pytest.raises(ValueError):
        beam_group(tiny_fp32, [], 2, 4)
    with pytest.raises(ValueError):
        BeamSearch(0, 4)
    with pytest.raises(ContextLengthError, match="exceed the context"):
        beam_group(tiny_fp32, [1] * 250, 2, 10)
    with pytest.raises(ContextLengthError, match="exceed the context") as refused:
        ScoreGroup("score", [1] * 250, [[1] * 10], tiny_fp32.max_seq_len)
    assert refused.value.field == "candidates"
    for candidates in ([], [[1], []]):
        with pytest.raises(ValueError):
            ScoreGroup("score", [1], candidates, tiny_fp32.max_seq_len)


def test_the_compiled_int8_decoder_runs_beam_search_and_scoring(tiny_int8_compiled, tiny_tokenizer, beside):
    prompt = tiny_tokenizer.encode(RAW)
    candidates = beam_search(tiny_int8_compiled, tiny_tokenizer, prompt, 4, 8, 1.0, tiny_tokenizer.eos_token_ids,
                             beside=beside)
    assert len(candidates) == 4 and len({tuple(c.token_ids) for c in candidates}) == 4
    # Beams are decoded by the compiled step, candidates fed as an eager prefill: the same up to rounding.
    scores = score_candidates(tiny_int8_compiled, tiny_tokenizer, prompt, [c.token_ids for c in candidates])
    assert scores == pytest.approx([c.score for c in candidates], abs=1e-3)
