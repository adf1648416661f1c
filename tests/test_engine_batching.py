"""Continuous batching on the tiny model: a sequence's tokens do not depend on what shares its batch.

Every comparison is against the same engine running the sequence alone, for both decoders.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from shared.exceptions import ContextLengthError
from shared.sampling import SamplingParams
from tests.engine_helpers import (
    greedy,
    greedy_alone,
    load_fp32,
    load_int8,
    run_engine,
    tiny_prompts,
    transformers_greedy,
)
from workers.cpu.decoder import INT8Decoder
from workers.engine.engine import Engine
from workers.engine.kv_cache import KVCache
from workers.engine.sequence import FinishReason, Sequence

pytest_plugins = ["tests.engine_fixtures"]
pytestmark = pytest.mark.usefixtures("one_thread")

LOADERS = {"fp32": load_fp32, "int8": load_int8}


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer) -> list[list[int]]:
    return tiny_prompts(tiny_tokenizer)


@pytest.fixture(scope="module")
def alone(tiny_fp32, tiny_int8, tiny_int8_compiled, tiny_tokenizer, prompts) -> dict[str, list[list[int]]]:
    """20 greedy tokens of each prompt decoded on its own, per decoder (EOS ignored)."""
    decoders = (("fp32", tiny_fp32), ("int8", tiny_int8), ("int8-compiled", tiny_int8_compiled))
    return {name: greedy_alone(decoder, tiny_tokenizer, prompts, 20, eos_token_ids=[]) for name, decoder in decoders}


def kind(decoder) -> str:
    if isinstance(decoder, INT8Decoder):
        return "int8-compiled" if decoder.decode_is_compiled else "int8"
    return "fp32"


def test_batch_of_different_lengths_matches_each_alone(tiny_decoder, tiny_tokenizer, prompts, alone):
    assert len({len(p) for p in prompts}) == len(prompts)
    assert greedy(tiny_decoder, tiny_tokenizer, prompts, 20, eos_token_ids=[]) == alone[kind(tiny_decoder)]


def test_sequences_finishing_mid_batch_leave_the_others_intact(tiny_decoder, tiny_tokenizer, prompts, alone):
    # The first and third finish early, so the cache is compacted twice while the others decode.
    max_tokens = [3, 20, 1, 12, 20]
    params = [SamplingParams(max_tokens=n, temperature=0.0) for n in max_tokens]
    results = run_engine(tiny_decoder, tiny_tokenizer, prompts, params, eos_token_ids=[])
    assert [r.ids for r in results] == [ids[:n] for ids, n in zip(alone[kind(tiny_decoder)], max_tokens)]
    assert all(r.finish_reason == FinishReason.LENGTH for r in results)


@pytest.mark.parametrize("name", LOADERS)
def test_more_sequences_than_slots_wait_and_reuse_freed_slots(name, tiny_dir, tiny_tokenizer, prompts, alone):
    decoder = LOADERS[name](tiny_dir, max_batch_size=2)
    max_tokens = [20, 4, 20, 9, 20]
    most_active = []
    params = [SamplingParams(max_tokens=n, temperature=0.0) for n in max_tokens]
    results = run_engine(decoder, tiny_tokenizer, prompts, params, eos_token_ids=[],
                         after_step=lambda engine, step: most_active.append(len(engine.active)))
    assert max(most_active) == 2
    assert [r.ids for r in results] == [ids[:n] for ids, n in zip(alone[name], max_tokens)]


def test_prefilling_sequence_moves_down_when_a_running_one_leaves(tiny_decoder, tiny_tokenizer):
    short = [tiny_tokenizer.encode("a"), tiny_tokenizer.encode("b")]
    long = tiny_tokenizer.encode("A long prompt, prefilled two tokens per step while the others decode: " * 2)
    prompts, max_tokens = [*short, long], [6, 16, 10]
    slots: list[int] = []

    def record(engine, step):
        if engine.prefilling is not None and engine.prefilling.id == "2":
            slots.append(engine.prefilling.slot)

    params = [SamplingParams(max_tokens=n, temperature=0.0) for n in max_tokens]
    results = run_engine(tiny_decoder, tiny_tokenizer, prompts, params, eos_token_ids=[], prefill_chunk=2,
                         after_step=record)
    assert slots[0] == 2 and 1 in slots  # moved down while still being prefilled
    expected = [greedy(tiny_decoder, tiny_tokenizer, [ids], n, eos_token_ids=[])[0]
                for ids, n in zip(prompts, max_tokens)]
    assert [r.ids for r in results] == expected


def test_cancel_ends_a_running_sequence_and_frees_its_slot(tiny_dir, tiny_tokenizer, prompts, alone):
    decoder = load_fp32(tiny_dir, max_batch_size=2)
    admitted_at: dict[str, int] = {}

    def intervene(engine, step):
        if step == 3:
            assert engine.cancel("0")
        for sequence in engine.active:
            admitted_at.setdefault(sequence.id, step)

    params = SamplingParams(max_tokens=12, temperature=0.0)
    cancelled, other, waiting = run_engine(decoder, tiny_tokenizer, prompts[:3], params, eos_token_ids=[],
                                           after_step=intervene)
    assert cancelled.finish_reason == FinishReason.CANCELLED
    assert 0 < len(cancelled.ids) < 12 and cancelled.ids == alone["fp32"][0][: len(cancelled.ids)]
    last = cancelled.updates[-1]
    assert last.finished and last.token is None and last.text == ""
    assert cancelled.text == cancelled.output_text
    assert admitted_at["2"] == 4  # the step after the cancel, into the freed slot
    assert other.ids == alone["fp32"][1][:12] and waiting.ids == alone["fp32"][2][:12]


def test_cancel_waiting_and_prefilling_sequences(tiny_dir, tiny_tokenizer, prompts, alone):
    decoder = load_fp32(tiny_dir, max_batch_size=1)
    long = tiny_tokenizer.encode("Several prefill chunks long, this prompt is cancelled half-way through. " * 2)
    engine = Engine(decoder, tiny_tokenizer.backend, [], prefill_chunk=4)
    params = SamplingParams(max_tokens=8, temperature=0.0)
    prefilling, waiting, last = (Sequence(str(i), ids, params, tiny_tokenizer.backend)
                                 for i, ids in enumerate([long, prompts[0], prompts[1]]))
    for sequence in (prefilling, waiting, last):
        engine.add(sequence)
    engine.step()
    assert engine.prefilling is prefilling and 0 < prefilling.prefilled < len(long)
    assert engine.cancel("0") and engine.cancel("1") and not engine.cancel("no-such-id")
    updates = engine.step()
    assert [(u.sequence.id, u.token, u.finished) for u in updates[:2]] == [("0", None, True), ("1", None, True)]
    assert prefilling.finish_reason == waiting.finish_reason == FinishReason.CANCELLED
    assert prefilling.output_ids == waiting.output_ids == []
    while engine.has_work:
        engine.step()
    assert last.output_ids == alone["fp32"][1][:8]  # took over the cancelled sequence's slot
    assert not engine.cancel("2")  # finished sequences are gone


def test_check_fits_refuses_requests_longer_than_the_context(tiny_fp32, tiny_tokenizer):
    engine = Engine(tiny_fp32, tiny_tokenizer.backend, [])
    context = tiny_fp32.max_seq_len
    engine.check_fits(context - 10, 10)
    with pytest.raises(ContextLengthError, match=f"context of {context} tokens"):
        engine.check_fits(context - 10, 11)
    too_long = Sequence("x", [42] * context, SamplingParams(max_tokens=1), tiny_tokenizer.backend)
    with pytest.raises(ContextLengthError, match=f"{context} tokens and max_tokens is 1"):
        engine.add(too_long)
    assert not engine.has_work
    small = Engine(tiny_fp32, tiny_tokenizer.backend, [], max_tokens_in_flight=100)
    with pytest.raises(ValueError, match="more than the 100"):
        small.check_fits(60, 41)


def test_cache_growth_mid_decode_keeps_earlier_keys(tiny_dir, tiny_tokenizer):
    decoder = load_int8(tiny_dir, max_seq_len=512)  # the slot layout, which grows all slots at once
    prompt = tiny_tokenizer.encode("Tokens to fill most of the first cache block. " * 24)[:240]
    assert decoder.cache.capacity < len(prompt) + 32  # the cache grows while this sequence decodes
    expected = greedy_alone(load_int8(tiny_dir, max_seq_len=512), tiny_tokenizer, [prompt], 32)[0]
    neighbour = tiny_tokenizer.encode("a short neighbour")
    assert greedy(decoder, tiny_tokenizer, [prompt, neighbour], 32)[0] == expected
    assert decoder.cache.capacity >= len(prompt) + 31


def test_blocks_lent_mid_decode_keep_earlier_keys(tiny_dir, tiny_hf, tiny_tokenizer):
    decoder = load_fp32(tiny_dir, max_seq_len=512)  # the paged cache: blocks are lent as sequences grow
    prompt = tiny_tokenizer.encode("Tokens to fill most of the first cache block. " * 24)[:240]
    expected = transformers_greedy(tiny_hf, prompt, 32, tiny_tokenizer.eos_token_ids)
    neighbour = tiny_tokenizer.encode("a short neighbour")
    lent = []
    ids = greedy(decoder, tiny_tokenizer, [prompt, neighbour], 32,
                 after_step=lambda engine, step: lent.append(decoder.cache.blocks_in_use))[0]
    assert ids == expected
    assert lent[0] < max(lent)  # the long sequence crossed into blocks lent while it decoded


def test_a_worker_takes_only_what_its_next_prefill_uses(tiny_fp32, tiny_tokenizer):
    # Requests arriving together are prefilled together, but a worker never hoards its pool's queue.
    engine = Engine(tiny_fp32, tiny_tokenizer.backend, [], prefill_chunk=24)
    params = SamplingParams(max_tokens=4, temperature=0.0)
    taken = []
    while engine.wants_more():
        sequence = Sequence(str(len(taken)), list(range(5, 15)), params, tiny_tokenizer.backend)  # 10 tokens
        engine.add(sequence)
        taken.append(sequence)
    assert len(taken) == 3  # after 10 + 10 waiting tokens the next prefill (24) still has room; 30 fill it
    engine.step()
    assert len(engine.running) == 2 and [s.slot for s in taken[:2]] == [0, 1]  # prefilled together
    assert list(engine.waiting) == [taken[2]]  # over the budget: it waits for the next step


def test_batch_work_waiting_for_its_prefill_never_keeps_an_interactive_request_out(tiny_fp32, tiny_tokenizer):
    engine = Engine(tiny_fp32, tiny_tokenizer.backend, [], prefill_chunk=24)
    params = SamplingParams(max_tokens=4, temperature=0.0)
    batch = [Sequence(f"batch{i}", list(range(5, 35)), params, tiny_tokenizer.backend) for i in range(2)]  # 30 each
    for sequence in batch:
        engine.add(sequence, yields=True)
    assert not engine.wants_more()  # more batch work would not be prefilled next
    assert engine.wants_more(urgent=True)  # but an interactive request would go ahead of it
    interactive = Sequence("interactive", [5, 6, 7], params, tiny_tokenizer.backend)
    engine.add(interactive)
    assert list(engine.waiting) == [interactive, *batch]
    engine.step()
    assert engine.running == [interactive]  # prefilled first; the long batch prompts follow chunk by chunk


def test_a_full_batch_takes_no_more(tiny_dir, tiny_tokenizer):
    decoder = load_fp32(tiny_dir, max_batch_size=2)
    engine = Engine(decoder, tiny_tokenizer.backend, [], prefill_chunk=256)
    params = SamplingParams(max_tokens=4, temperature=0.0)
    for index in range(2):
        assert engine.wants_more()
        engine.add(Sequence(str(index), [5, 6, 7], params, tiny_tokenizer.backend))
    assert not engine.wants_more()
    engine.step()
    assert len(engine.running) == 2 and not engine.wants_more()


def test_the_int8_decoders_kv_cache_takes_half_the_memory(tiny_dir):
    # Decode attention reads the whole cache every step; half precision halves that traffic and the memory.
    def cache_bytes(decoder):
        return sum(t.numel() * t.element_size() for t in (*decoder.cache.keys, *decoder.cache.values))

    int8 = load_int8(tiny_dir)
    config = int8.config
    fp32 = KVCache(num_layers=config.num_layers, max_slots=int8.max_batch_size, num_kv_heads=config.num_kv_heads,
                   head_dim=config.head_dim, max_len=int8.max_seq_len, dtype=torch.float32, device="cpu")
    assert cache_bytes(int8) * 2 == cache_bytes(SimpleNamespace(cache=fp32))


@pytest.mark.parametrize("stop", [(), ("e",)])
def test_a_resumed_sequence_goes_on_exactly_where_its_stream_stopped(tiny_fp32, tiny_tokenizer, prompts, stop):
    # A worker died after sending 7 tokens; another prefills prompt + those 7 and carries on.
    params = SamplingParams(max_tokens=16, temperature=0.0, stop=stop)
    whole = Engine(tiny_fp32, tiny_tokenizer.backend, []).run(
        [Sequence("whole", prompts[1], params, tiny_tokenizer.backend)])[0]
    sent = whole.output_ids[:7]
    engine = Engine(tiny_fp32, tiny_tokenizer.backend, [])
    resumed = Sequence("resumed", prompts[1], params, tiny_tokenizer.backend)
    engine.add(resumed, sent)
    updates = []
    while not resumed.finished:
        updates += engine.step()
    assert resumed.output_ids == whole.output_ids and resumed.output_text == whole.output_text
    assert [u.index for u in updates if u.token is not None] == list(range(7, len(whole.output_ids)))
    assert resumed.finish_reason == whole.finish_reason


def test_a_sequence_whose_resumed_tokens_already_ended_it_finishes_at_once(tiny_fp32, tiny_tokenizer, prompts):
    params = SamplingParams(max_tokens=5, temperature=0.0)
    whole = Engine(tiny_fp32, tiny_tokenizer.backend, []).run(
        [Sequence("whole", prompts[0], params, tiny_tokenizer.backend)])[0]
    engine = Engine(tiny_fp32, tiny_tokenizer.backend, [])
    resumed = Sequence("resumed", prompts[0], params, tiny_tokenizer.backend)
    engine.add(resumed, whole.output_ids)  # its worker died between the last token and `done`
    assert [(u.token, u.finished) for u in engine.step()] == [(None, True)]
    assert resumed.output_text == whole.output_text and resumed.finish_reason == FinishReason.LENGTH
    assert not engine.has_work
