"""The engine on the real SmolLM2-135M-Instruct: against transformers, batched against alone, INT8 against fp32.

Each decoder is loaded once per session and transformers' outputs are computed once (see engine_fixtures).
The INT8 bounds sit about a quarter beyond what bench.int8_quality measures on the first two chunks of its
text (its figures over the whole text: BENCHMARKS.md, "INT8 fidelity (KL divergence from the fp32 path)").
"""

from __future__ import annotations

import pytest
import torch

from bench.agreement import confident_agreement, teacher_forced_logits, top1_agreement
from bench.int8_quality import REFERENCE, Fidelity, measure, position_logits, text_chunks
from tests.engine_helpers import REAL_NEW_TOKENS, greedy, greedy_alone
from workers.engine.attention import QUERY_BLOCK
from workers.engine.sequence import FinishReason

pytest_plugins = ["tests.engine_fixtures"]
pytestmark = pytest.mark.model

PROMPTS = range(6)  # three chat-templated prompts, three raw ones (engine_helpers.REAL_CHAT, REAL_RAW)


@pytest.mark.parametrize("index", PROMPTS)
def test_fp32_greedy_matches_transformers_generate(index, real_fp32_alone, real_transformers_greedy, real_tokenizer):
    ours, expected = real_fp32_alone[index], real_transformers_greedy[index]
    assert ours.ids == expected
    ended_on_eos = expected[-1] in real_tokenizer.eos_token_ids
    assert ours.finish_reason == (FinishReason.EOS if ended_on_eos else FinishReason.LENGTH)


def test_streamed_text_is_the_decoded_output(real_fp32_alone, real_tokenizer):
    for result in real_fp32_alone:
        assert result.text == result.output_text == real_tokenizer.decode(result.ids)


def test_fp32_batch_of_different_lengths_matches_each_alone(real_fp32, real_tokenizer, real_prompts, real_fp32_alone):
    assert len({len(p) for p in real_prompts}) >= 4  # from 6 to 38 tokens
    batched = greedy(real_fp32, real_tokenizer, real_prompts, REAL_NEW_TOKENS)
    assert batched == [result.ids for result in real_fp32_alone]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_int8_batch_of_different_lengths_matches_each_alone(compiled, request, real_tokenizer, real_prompts):
    decoder = request.getfixturevalue("real_int8_compiled" if compiled else "real_int8")
    alone = greedy_alone(decoder, real_tokenizer, real_prompts, 32)
    assert greedy(decoder, real_tokenizer, real_prompts, 32) == alone


def decode_choices(decoder, prompt: list[int], answer: list[int]) -> list[int]:
    """The decoder's greedy pick at each step of `answer`, fed back token by token through decode()."""
    picks = [int(decoder.prefill(0, prompt).argmax())]
    for position, token in enumerate(answer[:-1], start=len(prompt)):
        picks.append(int(decoder.decode([token], [position])[0].argmax()))
    return picks


def test_compiled_int8_decode_picks_the_eager_decoders_tokens(real_int8, real_int8_compiled, real_tokenizer,
                                                              real_prompts):
    # Same context for both; different kernels round differently, so they may part only where the model
    # hesitates, as INT8 and fp32 do (BENCHMARKS.md, "INT8 fidelity (KL divergence from the fp32 path)").
    answers = greedy_alone(real_int8, real_tokenizer, real_prompts, 24)
    steps = same = 0
    for prompt, answer in zip(real_prompts, answers):
        picks = decode_choices(real_int8_compiled, prompt, answer)
        steps, same = steps + len(answer), same + sum(a == b for a, b in zip(picks, answer))
    assert same / steps > 0.9


TEXT_CHUNKS = 2
"""The first 2 of bench.int8_quality's chunks (510 scored positions), to keep the module within a minute."""

KL_MEAN_BOUND, KL_P99_BOUND = 0.016, 0.09
"""One-pass INT8's mean and 99th-percentile KL from fp32, in nats."""

RESIDUAL_KL_MEAN_BOUND = 2e-5
"""Two-pass INT8's mean KL: rounding at about 16 bits, far below one pass's and a bf16 model's."""


@pytest.fixture(scope="module")
def text_fidelity(real_fp32, real_int8, real_int8_residual, real_tokenizer) -> dict[str, Fidelity]:
    """Both INT8 forms scored against fp32 on the fixed text, as bench.int8_quality scores them."""
    paths = {"one pass": lambda ids: position_logits(real_int8, ids),
             "two passes": lambda ids: position_logits(real_int8_residual, ids)}
    return measure(lambda ids: position_logits(real_fp32, ids), paths, text_chunks(real_tokenizer, TEXT_CHUNKS))


def test_int8_next_token_distributions_stay_close_to_fp32s(text_fidelity):
    fp32, int8 = text_fidelity[REFERENCE], text_fidelity["one pass"]
    assert fp32.perplexity < 20  # the fixed text is ordinary English documentation to this model
    assert int8.perplexity / fp32.perplexity < 1.03
    assert int8.mean_kl < KL_MEAN_BOUND
    assert int8.kl_percentile(99) < KL_P99_BOUND
    assert int8.same_top_share > 0.9


def test_two_pass_int8_is_fp32_up_to_rounding(text_fidelity):
    fp32, two_pass = text_fidelity[REFERENCE], text_fidelity["two passes"]
    assert two_pass.mean_kl < RESIDUAL_KL_MEAN_BOUND
    assert two_pass.same_top_share > 0.995
    assert abs(two_pass.perplexity / fp32.perplexity - 1) < 0.001


def test_int8_follows_fp32s_greedy_answers(real_int8, real_fp32, real_prompts, real_fp32_alone):
    # Given the same context, INT8 picks fp32's next token; where they differ, fp32 was hesitating.
    pairs = [(teacher_forced_logits(real_int8, ids, r.ids), teacher_forced_logits(real_fp32, ids, r.ids))
             for ids, r in zip(real_prompts, real_fp32_alone)]
    int8, fp32 = torch.cat([q for q, _ in pairs]), torch.cat([f for _, f in pairs])
    # One prefill over prompt + answer picks the answer's tokens again, as decoding step by step did.
    assert [f.argmax(-1).tolist() for _, f in pairs] == [r.ids for r in real_fp32_alone]
    assert top1_agreement(int8, fp32) > 0.8
    assert confident_agreement(int8, fp32) > 0.93


def test_int8_prefill_cut_at_multiples_of_the_query_block_is_bit_identical(real_int8, real_tokenizer):
    """However a prompt is cut at multiples of QUERY_BLOCK (chunked prefill; a prefix whose KV is kept), the
    INT8 decoder computes the same logits and the same cache, bit for bit. Before attention took queries in
    fixed blocks, a 300-token prompt prefilled as 160 + 140 tokens had logits up to 1.08 away from the whole
    prefill's, and another next token."""
    prompt = text_chunks(real_tokenizer, chunks=1)[0][:300]
    cuts = {0: [300], 1: [10 * QUERY_BLOCK, 140], 2: [16 * QUERY_BLOCK, 44], 3: [QUERY_BLOCK] * 18 + [12]}
    logits = {}
    for slot, sizes in cuts.items():
        start = 0
        for size in sizes:
            logits[slot] = real_int8.prefill(slot, prompt[start: start + size], start=start)
            start += size
    for slot in (1, 2, 3):
        assert torch.equal(logits[slot], logits[0]), cuts[slot]
        for layer_keys, layer_values in zip(real_int8.cache.keys, real_int8.cache.values):
            assert torch.equal(layer_keys[slot, :, :300], layer_keys[0, :, :300])
            assert torch.equal(layer_values[slot, :, :300], layer_values[0, :, :300])
