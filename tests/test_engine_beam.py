"""Beam search and candidate scoring against transformers' `generate(num_beams=...)` and greedy decoding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shared.exceptions import ContextLengthError
from shared.tokenizer import TextTokenizer
from tests.engine_helpers import REAL_WEIGHTS as WEIGHTS
from workers.cpu.decoder import INT8Decoder
from workers.features.beam import BeamSearch, beam_search
from workers.features.scoring import CandidateScorer, score_candidates
from workers.gpu.decoder import CUDADecoder

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
RAW = "The three primary colors are"


def load_fp32(folder) -> CUDADecoder:
    return CUDADecoder(device="cpu", max_batch_size=4, max_seq_len=256).load_weights(folder)


def load_hf(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def hf_beams(model, prompt_ids: list[int], width: int, max_new_tokens: int, eos: list[int],
             length_penalty: float = 1.0) -> list[tuple[list[int], float]]:
    """transformers' returned sequences (after the prompt, cut after their first EOS) and sequences_scores."""
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=width, num_return_sequences=width,
                         do_sample=False, max_new_tokens=max_new_tokens, length_penalty=length_penalty,
                         early_stopping=False, eos_token_id=eos, pad_token_id=eos[0],
                         output_scores=True, return_dict_in_generate=True)
    if width == 1:  # transformers then decodes greedily and reports per-step logits, not a sequence score
        steps = torch.stack(out.scores, dim=1).log_softmax(-1)  # [1, steps, V]
        chosen = out.sequences[:, len(prompt_ids):]
        logprob = steps.gather(-1, chosen[..., None]).sum().item()
        return [(chosen[0].tolist(), logprob / chosen.shape[1] ** length_penalty)]
    beams = []
    for row, score in zip(out.sequences[:, len(prompt_ids):].tolist(), out.sequences_scores.tolist()):
        ends = [i for i, token in enumerate(row) if token in eos]  # finished shorter rows are padded with EOS
        beams.append((row[: ends[0] + 1] if ends else row, score))
    return beams


def greedy(decoder, prompt_ids: list[int], max_new_tokens: int, eos: list[int]) -> list[int]:
    """Plain argmax decoding on the decoder's own slot 0."""
    logits, out = decoder.prefill(0, prompt_ids), []
    while True:
        out.append(int(logits.argmax()))
        if out[-1] in eos or len(out) == max_new_tokens:
            return out
        logits = decoder.decode([out[-1]], [len(prompt_ids) + len(out) - 1])[0]


def assert_same_beams(ours, theirs) -> None:
    assert [c.token_ids for c in ours] == [ids for ids, _ in theirs]
    assert [c.score for c in ours] == pytest.approx([score for _, score in theirs], abs=1e-4)


# -- tiny random model --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_weights):
    return load_fp32(tiny_weights), load_hf(tiny_weights), TextTokenizer(tiny_weights)


@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("length_penalty", [1.0, 0.0, -0.5, 2.0])
def test_tiny_beams_match_transformers(tiny, width, length_penalty):
    decoder, hf, tokenizer = tiny
    prompt = tokenizer.encode(RAW)
    # EOS ids drawn from the runner-up endings of an EOS-free search, so that hypotheses finish at
    # different lengths: the merge, the length penalty and the early-stop heuristic all come into play.
    free = beam_search(decoder, prompt, 4, 12, length_penalty, [])
    eos = sorted({free[1].token_ids[-1], free[2].token_ids[-1]})
    ours = beam_search(decoder, prompt, width, 12, length_penalty, eos)
    assert_same_beams(ours, hf_beams(hf, prompt, width, 12, eos, length_penalty))
    assert len(ours) == width and (width < 4 or any(c.ended_with_eos for c in ours))


@pytest.mark.parametrize("eos_kind", ["one", "three"])
def test_tiny_chat_beams_match_transformers(tiny, eos_kind):
    decoder, hf, tokenizer = tiny
    prompt = tokenizer.encode_chat(CHAT)
    # Three EOS ids keep 4 * 4 candidates a step instead of 2 * 4.
    eos = tokenizer.eos_token_ids
    if eos_kind == "three":
        eos = sorted({*eos, *greedy(decoder, prompt, 6, [])[3:5]})
    ours = beam_search(decoder, prompt, 4, 10, 1.0, eos)
    assert_same_beams(ours, hf_beams(hf, prompt, 4, 10, eos))


def test_width_one_is_greedy(tiny):
    decoder, _, tokenizer = tiny
    prompt = tokenizer.encode(RAW)
    eos = [greedy(decoder, prompt, 8, [])[5]]
    [best] = beam_search(decoder, prompt, 1, 16, 1.0, eos)
    assert best.token_ids == greedy(decoder, prompt, 16, eos)
    assert best.ended_with_eos


def test_step_api_and_running_batch_untouched(tiny):
    decoder, _, tokenizer = tiny
    decoder.prefill(0, tokenizer.encode("a running sequence"))
    before = [k[:1].clone() for k in decoder.cache.keys]
    search = BeamSearch(decoder, tokenizer.encode(RAW), width=3, max_new_tokens=5,
                        eos_token_ids=tokenizer.eos_token_ids)
    steps = 1
    while not search.step():  # one forward pass per step: a worker may interleave other work here
        steps += 1
        assert search.stop_reason == "" and len(search.results()) <= 3  # only hypotheses finished so far
    assert steps == 5 and search.stop_reason == "length" and search.step()
    results = search.results()
    assert len(results) == 3 and [c.score for c in results] == sorted((c.score for c in results), reverse=True)
    assert all(torch.equal(a, b[:1]) for a, b in zip(before, decoder.cache.keys))


def test_scores_equal_beam_scores_and_prefer_greedy(tiny):
    decoder, _, tokenizer = tiny
    prompt = tokenizer.encode(RAW)
    candidates = beam_search(decoder, prompt, 4, 8, 0.5, tokenizer.eos_token_ids)
    scores = score_candidates(decoder, prompt, [c.token_ids for c in candidates], length_penalty=0.5)
    assert scores == pytest.approx([c.score for c in candidates], abs=1e-4)
    random_ids = torch.randint(0, tokenizer.vocab_size, (8,), generator=torch.Generator().manual_seed(0)).tolist()
    good, bad = score_candidates(decoder, prompt, [greedy(decoder, prompt, 8, []), random_ids])
    assert good > bad


@pytest.fixture
def passes(tiny, monkeypatch) -> list[int]:
    """Tokens fed by each forward pass of the tiny fp32 decoder's model (rows x new tokens), as they happen."""
    model = tiny[0].model
    forward = model.forward
    seen = []

    def counting(tokens, *args, **kwargs):
        seen.append(tokens.numel())
        return forward(tokens, *args, **kwargs)

    monkeypatch.setattr(model, "forward", counting)
    return seen


def test_a_long_prompt_is_prefilled_a_chunk_per_step_and_the_beams_still_match_transformers(tiny, passes):
    decoder, hf, tokenizer = tiny
    prompt = tokenizer.encode(" ".join([RAW] * 8))  # several chunks of 8
    eos = tokenizer.eos_token_ids
    search = BeamSearch(decoder, prompt, 3, 8, 1.0, eos, prefill_chunk=8)
    steps = 1
    while not search.step():
        steps += 1
    chunks = -(-len(prompt) // 8)
    assert len(prompt) > 24 and steps == chunks - 1 + 8  # the last chunk's step makes the first choice
    assert passes[:chunks] == [8] * (chunks - 1) + [len(prompt) - 8 * (chunks - 1)] and max(passes) <= 8
    assert_same_beams(search.results(), hf_beams(hf, prompt, 3, 8, eos))


def test_scoring_runs_a_chunk_per_step_and_agrees_with_beam_scores(tiny, passes):
    decoder, _, tokenizer = tiny
    prompt = tokenizer.encode(" ".join([RAW] * 8))
    candidates = beam_search(decoder, prompt, 4, 10, 0.5, tokenizer.eos_token_ids)
    passes.clear()
    scorer = CandidateScorer(decoder, prompt, [c.token_ids for c in candidates], prefill_chunk=8)
    steps = 1
    while not scorer.step():  # one forward pass per step
        steps += 1
    assert steps == len(passes) and max(passes) <= 8
    assert scorer.scores(0.5) == pytest.approx([c.score for c in candidates], abs=1e-4)
    assert score_candidates(decoder, prompt, [c.token_ids for c in candidates], 0.5) == pytest.approx(
        scorer.scores(0.5), abs=1e-5)  # in one pass each: the same up to rounding


def test_scoring_single_token_candidates_needs_only_the_prompt(tiny, passes):
    decoder, _, tokenizer = tiny
    prompt = tokenizer.encode(RAW)
    scorer = CandidateScorer(decoder, prompt, [[5], [7], [9]], prefill_chunk=4)
    steps = 1
    while not scorer.step():
        steps += 1
    assert steps == len(passes) == -(-len(prompt) // 4)
    first = F.log_softmax(decoder.prefill(0, prompt).float(), dim=-1)
    assert scorer.scores() == pytest.approx([first[5].item(), first[7].item(), first[9].item()], abs=1e-4)


def test_bad_arguments(tiny):
    decoder, _, _ = tiny
    with pytest.raises(ValueError):
        BeamSearch(decoder, [], 2, 4)
    with pytest.raises(ValueError):
        BeamSearch(decoder, [1], 0, 4)
    with pytest.raises(ContextLengthError, match="exceed the context"):
        BeamSearch(decoder, [1] * 250, 2, 10)
    with pytest.raises(ContextLengthError, match="exceed the context"):
        score_candidates(decoder, [1] * 250, [[1] * 10])
    with pytest.raises(ValueError):
        score_candidates(decoder, [1], [[]])


def test_int8_decoder_runs_beam_search(tiny_weights, tiny):
    decoder = INT8Decoder(max_batch_size=2, max_seq_len=128).load_quantized_weights(tiny_weights / "int8")
    prompt = tiny[2].encode(RAW)
    candidates = beam_search(decoder, prompt, 4, 8, 1.0, tiny[2].eos_token_ids)
    assert len(candidates) == 4 and len({tuple(c.token_ids) for c in candidates}) == 4
    assert score_candidates(decoder, prompt, [c.token_ids for c in candidates]) == pytest.approx(
        [c.score for c in candidates], abs=1e-3)


# -- SmolLM2 -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol():
    return load_fp32(WEIGHTS), load_hf(WEIGHTS), TextTokenizer(WEIGHTS)


@pytest.mark.model
@pytest.mark.parametrize("prompt_kind", ["chat", "raw"])
def test_smollm2_beams_match_transformers(smol, prompt_kind):
    decoder, hf, tokenizer = smol
    prompt = tokenizer.encode_chat(CHAT) if prompt_kind == "chat" else tokenizer.encode(RAW)
    eos = tokenizer.eos_token_ids
    ours = beam_search(decoder, prompt, 4, 24, 1.0, eos)
    assert_same_beams(ours, hf_beams(hf, prompt, 4, 24, eos))
    [best] = beam_search(decoder, prompt, 1, 24, 1.0, eos)
    assert best.token_ids == greedy(decoder, prompt, 24, eos)
    scores = score_candidates(decoder, prompt, [c.token_ids for c in ours])
    assert scores == pytest.approx([c.score for c in ours], abs=1e-4)


@pytest.mark.model
def test_smollm2_int8_beam_search():
    decoder = INT8Decoder(max_batch_size=2, max_seq_len=256).load_quantized_weights(WEIGHTS / "int8")
    tokenizer = TextTokenizer(WEIGHTS)
    candidates = beam_search(decoder, tokenizer.encode_chat(CHAT), 4, 24, 1.0, tokenizer.eos_token_ids)
    assert len(candidates) == 4
    assert "Paris" in tokenizer.decode(candidates[0].token_ids)
