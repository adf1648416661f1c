"""One sequence's failure is its own: a fault in its prefill, sampling, detokenizing or stop checks ends it
alone (FAILED, with the exception), and every other sequence gets the tokens it gets without the fault.

The INT8 decoder is batch invariant, so "the same tokens" is exact even though the culprit leaves the batch.
"""

from __future__ import annotations

import pytest

from shared.sampling import SamplingParams
from tests.engine_helpers import run_engine, tiny_prompts
from workers.engine.sequence import FinishReason

pytest_plugins = ["tests.engine_fixtures"]
pytestmark = pytest.mark.usefixtures("one_thread")

CULPRIT = 2
"""Index of the prompt whose work is made to fail (a raw prompt of a few tokens)."""


class InjectedFault(RuntimeError):
    """The failure a test plants in one sequence's work."""


def params() -> list[SamplingParams]:
    """Greedy for most, a seeded sampled one (its draws must not shift), a repetition penalty for the culprit."""
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    sampled = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=7)
    culprit = SamplingParams(max_tokens=12, temperature=0.0, repetition_penalty=1.3)
    return [greedy, sampled, culprit, greedy, greedy]


def sequence(engine, index: int):
    """The engine's sequence for prompt `index` (run_engine names them by index)."""
    return next(s for s in (*engine.active, *engine.waiting) if s.id == str(index))


def raise_fault(*_args, **_kwargs):
    raise InjectedFault("injected")


def fail_detokenizing(engine, step):
    if step == 3:
        sequence(engine, CULPRIT).detokenizer.add = raise_fault


def fail_stop_filter(engine, step):
    if step == 3:
        sequence(engine, CULPRIT).stop_filter.push = raise_fault


def fail_sampling(engine, step):
    """A token id past the vocabulary in the culprit's repetition-penalty memory: its sampling raises."""
    if step == 3:
        sequence(engine, CULPRIT).sampling.seen.add(10**9)


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer) -> list[list[int]]:
    return tiny_prompts(tiny_tokenizer)[:5]


@pytest.fixture(scope="module")
def unfaulted(tiny_int8, tiny_tokenizer, prompts):
    """Every prompt's output without any fault, run together as in the faulty runs."""
    return run_engine(tiny_int8, tiny_tokenizer, prompts, params(), eos_token_ids=[])


def assert_only_the_culprit_failed(results, unfaulted) -> None:
    for index, (result, expected) in enumerate(zip(results, unfaulted)):
        if index == CULPRIT:
            assert result.finish_reason == FinishReason.FAILED
            assert result.updates[-1].finished and result.updates[-1].token is None
        else:
            assert result.finish_reason == FinishReason.LENGTH
            assert (result.ids, result.text) == (expected.ids, expected.text)


@pytest.mark.parametrize("fault", [fail_detokenizing, fail_stop_filter, fail_sampling])
def test_a_fault_in_one_sequences_token_fails_it_alone(tiny_int8, tiny_tokenizer, prompts, unfaulted, fault):
    results = run_engine(tiny_int8, tiny_tokenizer, prompts, params(), eos_token_ids=[], after_step=fault)
    assert_only_the_culprit_failed(results, unfaulted)
    streamed = [update.token for update in results[CULPRIT].updates[:-1]]
    assert streamed == unfaulted[CULPRIT].ids[:4]  # the fault struck its fifth token: four had streamed


def test_a_group_prefill_that_raises_is_retried_prompt_by_prompt(tiny_int8, tiny_tokenizer, prompts, unfaulted,
                                                                 monkeypatch):
    prefill_many = tiny_int8.prefill_many
    groups = []

    def failing_for_the_culprit(first_slot, group):
        groups.append(len(group))
        if prompts[CULPRIT] in group:
            raise InjectedFault("a prompt whose prefill raises")
        return prefill_many(first_slot, group)

    monkeypatch.setattr(tiny_int8, "prefill_many", failing_for_the_culprit)
    results = run_engine(tiny_int8, tiny_tokenizer, prompts, params(), eos_token_ids=[])
    assert groups == [5, 1, 1, 1, 1, 1]  # the group of five, then each prompt alone
    assert_only_the_culprit_failed(results, unfaulted)
    assert results[CULPRIT].ids == [] and isinstance(results[CULPRIT].updates[-1].sequence.error, InjectedFault)


def test_a_long_prompt_whose_chunk_prefill_raises_fails_alone(tiny_int8, tiny_tokenizer, prompts, monkeypatch):
    long_prompt = prompts[CULPRIT] * 6  # longer than the chunk: prefilled chunk by chunk
    together = [*prompts[:CULPRIT], long_prompt, *prompts[CULPRIT + 1:]]
    unfaulted = run_engine(tiny_int8, tiny_tokenizer, together, params(), eos_token_ids=[], prefill_chunk=16)
    prefill = tiny_int8.prefill

    def failing_second_chunk(slot, tokens, start=0):
        if start == 16 and tokens == long_prompt[16:32]:
            raise InjectedFault("a chunk whose prefill raises")
        return prefill(slot, tokens, start)

    monkeypatch.setattr(tiny_int8, "prefill", failing_second_chunk)
    results = run_engine(tiny_int8, tiny_tokenizer, together, params(), eos_token_ids=[], prefill_chunk=16)
    assert_only_the_culprit_failed(results, unfaulted)


def test_a_failing_decode_pass_is_the_batchs_and_leaves_the_step(tiny_int8, tiny_tokenizer, prompts, monkeypatch):
    monkeypatch.setattr(tiny_int8, "decode", raise_fault)  # one pass for every running sequence
    with pytest.raises(InjectedFault):
        run_engine(tiny_int8, tiny_tokenizer, prompts, params(), eos_token_ids=[])
