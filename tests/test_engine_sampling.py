"""Sampling and stopping: the sampler against transformers' processors, and the engine's finish reasons."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from shared.sampling import SamplingParams
from tests.engine_helpers import greedy, run_engine, tiny_prompts, transformers_greedy
from workers.engine.sampler import SamplingState, apply_repetition_penalties, filter_top_k_top_p, sample
from workers.engine.sequence import FinishReason
from workers.gpu.decoder import CUDADecoder

pytest_plugins = ["tests.engine_fixtures"]
pytestmark = pytest.mark.usefixtures("one_thread")


def draw(logits: list[float], params: SamplingParams, times: int) -> Counter:
    """Token counts of `times` draws from one row of logits with one seeded sampling state."""
    state = SamplingState(params, prompt_ids=[])
    row = torch.tensor([logits])
    return Counter(sample(row.clone(), [state])[0] for _ in range(times))


# -- the sampler on its own ------------------------------------------------------------------------------


@pytest.mark.parametrize(("top_k", "top_p"), [(0, 0.9), (5, 1.0), (50, 0.5), (1, 0.3), (20, 0.05), (0, 1.0)])
def test_top_k_top_p_keep_the_tokens_transformers_keeps(top_k, top_p):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(top_k)) * 3
    ours = filter_top_k_top_p(logits, torch.full((4,), top_k), torch.full((4,), top_p))
    theirs = logits.clone()
    if top_k > 0:
        theirs = TopKLogitsWarper(top_k)(None, theirs)
    if top_p < 1.0:
        theirs = TopPLogitsWarper(top_p)(None, theirs)
    assert torch.equal(ours.isinf(), theirs.isinf())
    assert torch.equal(ours[~ours.isinf()], logits[~ours.isinf()])


def test_each_row_keeps_its_own_top_k_and_top_p():
    logits = torch.randn(1, 100, generator=torch.Generator().manual_seed(0)).expand(3, 100) * 3
    top_k, top_p = torch.tensor([3, 0, 10]), torch.tensor([1.0, 0.2, 0.6])
    together = filter_top_k_top_p(logits, top_k, top_p).isinf()
    for row in range(3):
        alone = filter_top_k_top_p(logits[row:row + 1], top_k[row:row + 1], top_p[row:row + 1]).isinf()
        assert torch.equal(together[row], alone[0])
    kept = (~together).sum(-1).tolist()
    assert kept[0] == 3 and kept[1] < 100 and kept[2] <= 10


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 1.0, 0.0], [1.0, -2.0, 0.5, 3.0, -1.0, 0.5]])
    states = [SamplingState(SamplingParams(repetition_penalty=1.5), [0, 1, 3]),
              SamplingState(SamplingParams(repetition_penalty=0.7), [1, 2, 3, 4])]
    ours = logits.clone()
    apply_repetition_penalties(ours, states)
    for row, (state, penalty) in enumerate(zip(states, (1.5, 0.7))):  # each row by its own penalty
        seen = torch.tensor([sorted(state.seen)])
        theirs = RepetitionPenaltyLogitsProcessor(penalty)(seen, logits[row:row + 1].clone())
        assert torch.equal(ours[row], theirs[0])


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_draws_follow_the_softmax_of_logits_over_temperature(temperature):
    logits = [1.0, 0.0, 2.0, -1.0, 0.5]
    counts = draw(logits, SamplingParams(temperature=temperature, seed=7), 4000)
    expected = torch.tensor(logits).div(temperature).softmax(-1).tolist()
    for token, p in enumerate(expected):
        assert abs(counts[token] / 4000 - p) < 0.03, (token, counts[token] / 4000, p)


@pytest.mark.parametrize(("params", "allowed"), [
    (SamplingParams(top_k=2, seed=1), {0, 1}),
    (SamplingParams(top_p=0.7, seed=2), {0, 1}),  # 0.5 + 0.3 covers 0.7
    (SamplingParams(top_p=0.85, seed=3), {0, 1, 2}),
    (SamplingParams(temperature=0.0, seed=4), {0}),
    (SamplingParams(top_k=1, temperature=1.5, seed=5), {0}),
])
def test_filters_never_draw_outside_what_they_keep(params, allowed):
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().tolist()
    assert set(draw(logits, params, 400)) == allowed


def test_seeded_rows_draw_the_same_tokens_whatever_shares_the_batch():
    vocab = 300
    logits = [torch.randn(4, vocab, generator=torch.Generator().manual_seed(step)) for step in range(40)]
    params = SamplingParams(temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.2, seed=99)
    alone, batched = SamplingState(params, [1, 2]), SamplingState(params, [1, 2])
    neighbours = [SamplingState(SamplingParams(temperature=0.0), []), SamplingState(SamplingParams(seed=5), [3]),
                  SamplingState(SamplingParams(temperature=1.3, top_p=0.5), [])]
    tokens_alone, tokens_batched = [], []
    for step_logits in logits:
        token = sample(step_logits[2:3].clone(), [alone])[0]
        alone.observe(token)
        tokens_alone.append(token)
        row = sample(step_logits.clone(), [neighbours[0], neighbours[1], batched, neighbours[2]])[2]
        batched.observe(row)
        tokens_batched.append(row)
    assert tokens_alone == tokens_batched


# -- the engine ------------------------------------------------------------------------------------------


SAMPLED = SamplingParams(max_tokens=24, temperature=0.9, top_k=50, top_p=0.95, seed=1234)


def test_same_seed_gives_the_same_tokens_alone_and_in_a_batch(tiny_decoder, tiny_tokenizer):
    prompts = tiny_prompts(tiny_tokenizer)
    first = run_engine(tiny_decoder, tiny_tokenizer, [prompts[0]], SAMPLED, eos_token_ids=[])[0].ids
    again = run_engine(tiny_decoder, tiny_tokenizer, [prompts[0]], SAMPLED, eos_token_ids=[])[0].ids
    other_seed = SamplingParams(max_tokens=24, temperature=0.9, top_k=50, top_p=0.95, seed=4321)
    different = run_engine(tiny_decoder, tiny_tokenizer, [prompts[0]], other_seed, eos_token_ids=[])[0].ids
    neighbours = [SamplingParams(max_tokens=24, temperature=0.0), SamplingParams(max_tokens=10, seed=5),
                  SamplingParams(max_tokens=24, temperature=1.2)]
    in_batch = run_engine(tiny_decoder, tiny_tokenizer, [prompts[1], prompts[0], prompts[2], prompts[3]],
                          [neighbours[0], SAMPLED, *neighbours[1:]], eos_token_ids=[])[1].ids
    assert first == again == in_batch
    assert different != first


def test_top_k_one_and_a_tiny_top_p_sample_greedily(tiny_fp32, tiny_tokenizer):
    prompt = tiny_prompts(tiny_tokenizer)[2]
    expected = greedy(tiny_fp32, tiny_tokenizer, [prompt], 16, eos_token_ids=[])
    hot = SamplingParams(max_tokens=16, temperature=1.5, seed=3)
    sampled = run_engine(tiny_fp32, tiny_tokenizer, [prompt], hot, eos_token_ids=[])[0].ids
    assert sampled != expected[0]  # at this temperature sampling does wander off the greedy path
    for params in (SamplingParams(max_tokens=16, temperature=1.5, top_k=1, seed=3),
                   SamplingParams(max_tokens=16, temperature=1.5, top_p=1e-6, seed=3)):
        assert [r.ids for r in run_engine(tiny_fp32, tiny_tokenizer, [prompt], params, eos_token_ids=[])] == expected


@pytest.mark.parametrize("penalty", [1.8, 0.5])
def test_repetition_penalty_matches_transformers_generate(penalty, tiny_decoder, tiny_hf, tiny_tokenizer):
    prompt = tiny_tokenizer.encode("the the the the the cat cat cat")
    eos = tiny_tokenizer.eos_token_ids
    params = SamplingParams(max_tokens=24, temperature=0.0, repetition_penalty=penalty)
    ours = run_engine(tiny_decoder, tiny_tokenizer, [prompt], params)[0].ids
    plain = run_engine(tiny_decoder, tiny_tokenizer, [prompt], SamplingParams(max_tokens=24, temperature=0.0))[0].ids
    if isinstance(tiny_decoder, CUDADecoder):  # transformers is the reference for the fp32 path
        assert ours == transformers_greedy(tiny_hf, prompt, 24, eos, repetition_penalty=penalty)
    if penalty < 1:  # this model seldom repeats itself, but favouring seen tokens makes it
        assert ours != plain and len(set(ours)) < len(set(plain))


def test_max_tokens_ends_with_length(tiny_decoder, tiny_tokenizer):
    result = run_engine(tiny_decoder, tiny_tokenizer, [tiny_prompts(tiny_tokenizer)[0]],
                        SamplingParams(max_tokens=7, temperature=0.0), eos_token_ids=[])[0]
    assert len(result.ids) == 7 and result.finish_reason == FinishReason.LENGTH
    assert [u.index for u in result.updates] == list(range(7))
    assert [u.finished for u in result.updates] == [False] * 6 + [True]


def test_eos_ends_generation_and_is_the_last_output_id(tiny_fp32, tiny_tokenizer):
    prompt = tiny_prompts(tiny_tokenizer)[0]
    params = SamplingParams(max_tokens=16, temperature=0.0)
    free = run_engine(tiny_fp32, tiny_tokenizer, [prompt], params, eos_token_ids=[])[0]
    at = next(i for i, token in enumerate(free.ids) if i >= 3 and token not in free.ids[:i])
    ended = run_engine(tiny_fp32, tiny_tokenizer, [prompt], params, eos_token_ids=[free.ids[at]])[0]
    assert ended.finish_reason == FinishReason.EOS
    assert ended.ids == free.ids[: at + 1]
    assert ended.text == ended.output_text == "".join(free.deltas[:at])  # the EOS token adds no text


def test_stop_sequence_ends_generation_before_it(tiny_fp32, tiny_tokenizer):
    prompt = tiny_prompts(tiny_tokenizer)[0]
    free = run_engine(tiny_fp32, tiny_tokenizer, [prompt], SamplingParams(max_tokens=32, temperature=0.0),
                      eos_token_ids=[])[0]
    stop = free.text[20:24]
    expected = free.text[: free.text.index(stop)]
    params = SamplingParams(max_tokens=32, temperature=0.0, stop=(stop,))
    stopped = run_engine(tiny_fp32, tiny_tokenizer, [prompt], params, eos_token_ids=[])[0]
    assert stopped.finish_reason == FinishReason.STOP
    # Deltas cannot be taken back: a streamed text equal to the cut text means no part of the stop was sent.
    assert stopped.text == stopped.output_text == expected
    assert stop not in stopped.text
    assert len(stopped.ids) < 32 and stopped.ids == free.ids[: len(stopped.ids)]


def test_the_earliest_of_several_stop_sequences_wins(tiny_fp32, tiny_tokenizer):
    prompt = tiny_prompts(tiny_tokenizer)[2]
    free = run_engine(tiny_fp32, tiny_tokenizer, [prompt], SamplingParams(max_tokens=32, temperature=0.0),
                      eos_token_ids=[])[0]
    late, early = free.text[30:33], free.text[12:15]
    params = SamplingParams(max_tokens=32, temperature=0.0, stop=(late, early))
    stopped = run_engine(tiny_fp32, tiny_tokenizer, [prompt], params, eos_token_ids=[])[0]
    assert stopped.finish_reason == FinishReason.STOP
    assert stopped.text == free.text[: min(free.text.index(early), free.text.index(late))]


@pytest.mark.parametrize("params", [SamplingParams(top_p=1e-300), SamplingParams(temperature=1e-300),
                                    SamplingParams(temperature=1e-300, top_p=1e-300, top_k=3)])
def test_extreme_sampling_values_pick_the_best_token_not_token_zero(params):
    logits = torch.tensor([[0.5, 3.0, 2.9, -1.0]] * 4)
    tokens = sample(logits, [SamplingState(params, []) for _ in range(4)])
    assert tokens == [1, 1, 1, 1]

