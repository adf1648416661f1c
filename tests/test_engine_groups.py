"""Groups in the engine's batch (beam searches, scoring): the rows they hold and when they get them, forks within
the batch cache, the slots they move to, cancellation, and a fault in a group's own work failing it alone."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from shared.sampling import SamplingParams
from tests.engine_helpers import beam_group, beam_search, greedy_alone, load_fp32, run_engine, score_candidates
from workers.engine.engine import Engine
from workers.engine.groups import GroupRow, fork
from workers.engine.sequence import FinishReason, Sequence
from workers.features.scoring import ScoreGroup

pytest_plugins = ["tests.engine_fixtures"]
pytestmark = pytest.mark.usefixtures("one_thread")

RAW = "The three primary colors are"


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer) -> list[list[int]]:
    return [tiny_tokenizer.encode(text) for text in ("The history of the Roman Empire", "a", "def f(x): return 2")]


def sequence(tokenizer, name: str, prompt: list[int], max_tokens: int) -> Sequence:
    return Sequence(name, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0), tokenizer.backend)


def test_a_beam_takes_a_row_per_beam_once_that_many_are_free_and_never_delays_an_interactive_one(
        tiny_dir, tiny_tokenizer, prompts):
    decoder = load_fp32(tiny_dir, max_batch_size=4)
    engine = Engine(decoder, tiny_tokenizer.backend, [])
    long, short = sequence(tiny_tokenizer, "long", prompts[0], 12), sequence(tiny_tokenizer, "short", prompts[1], 3)
    beam = beam_group(decoder, tiny_tokenizer.encode(RAW), 3, 6)
    for job in (long, short, beam):
        engine.add(job)
    engine.step()
    assert engine.running == [long, short] and list(engine.waiting) == [beam]  # 2 rows free, it needs 3
    assert not engine.wants_more() and engine.wants_more(urgent=True)  # batch work would wait; a stream not
    interactive = sequence(tiny_tokenizer, "interactive", prompts[2], 12)
    engine.add(interactive)
    assert list(engine.waiting) == [interactive, beam]
    engine.step()
    assert interactive in engine.running and list(engine.waiting) == [beam]
    while not short.finished:
        engine.step()
    while beam in engine.waiting:  # admitted at the first step that starts with three rows free
        free = 4 - len(engine.running)
        engine.step()
        assert (beam in engine.waiting) == (free < 3)
    rows = [row for row in engine.running if isinstance(row, GroupRow)]
    assert len(rows) == 3 and {row.group for row in rows} == {beam} and engine.active.count(beam) == 1
    assert sorted(row.slot for row in engine.running) == list(range(len(engine.running)))
    while engine.has_work:
        engine.step()
    assert [c.token_ids for c in beam.results()] == [
        c.token_ids for c in beam_search(decoder, tiny_tokenizer, tiny_tokenizer.encode(RAW), 3, 6)]


def test_sequences_beside_beams_and_scoring_get_the_tokens_they_get_alone(tiny_decoder, tiny_tokenizer, prompts):
    raw = tiny_tokenizer.encode(RAW)
    alone = greedy_alone(tiny_decoder, tiny_tokenizer, prompts, 12, eos_token_ids=[])
    beams_alone = beam_search(tiny_decoder, tiny_tokenizer, raw, 3, 10)
    candidates = [c.token_ids for c in beams_alone]
    scores_alone = score_candidates(tiny_decoder, tiny_tokenizer, raw, candidates)
    beam = beam_group(tiny_decoder, raw, 3, 10)
    scoring = ScoreGroup("score", raw, candidates, tiny_decoder.max_seq_len)
    # Different lengths: sequences leave while the beams fork, and the cache is compacted around them.
    params = [SamplingParams(max_tokens=n, temperature=0.0) for n in (3, 12, 7)]
    results = run_engine(tiny_decoder, tiny_tokenizer, prompts, params, eos_token_ids=[], groups=[beam, scoring])
    assert [r.ids for r in results] == [ids[:n] for ids, n in zip(alone, (3, 12, 7))]
    assert [c.token_ids for c in beam.results()] == [c.token_ids for c in beams_alone]
    assert [c.score for c in beam.results()] == pytest.approx([c.score for c in beams_alone], abs=1e-5)
    assert scoring.scores() == pytest.approx(scores_alone, abs=1e-6)


def test_a_scoring_job_moves_down_with_its_rows_while_it_is_fed(tiny_fp32, tiny_tokenizer, prompts):
    raw = tiny_tokenizer.encode(RAW)
    candidates = [tiny_tokenizer.encode(text) for text in (" red, yellow and blue.", " light and colour", " x")]
    expected = score_candidates(tiny_fp32, tiny_tokenizer, raw, candidates, prefill_chunk=3)
    scoring = ScoreGroup("score", raw, candidates, tiny_fp32.max_seq_len)
    slots = []

    def record(engine, step):
        if engine.prefilling is scoring and scoring.started:
            slots.append(scoring.slot)

    params = [SamplingParams(max_tokens=n, temperature=0.0) for n in (9, 11, 13)]
    run_engine(tiny_fp32, tiny_tokenizer, prompts, params, eos_token_ids=[], prefill_chunk=3, groups=[scoring],
               after_step=record)
    assert slots[0] == 3 and min(slots) < 3  # fed in slots 3..5, then moved down as sequences left
    assert scoring.scores() == pytest.approx(expected, abs=1e-5)


def test_cancelling_a_beam_search_frees_its_rows(tiny_dir, tiny_tokenizer, prompts):
    decoder = load_fp32(tiny_dir, max_batch_size=4)
    engine = Engine(decoder, tiny_tokenizer.backend, [])
    beam = beam_group(decoder, tiny_tokenizer.encode(RAW), 4, 20)
    waiting = sequence(tiny_tokenizer, "waiting", prompts[0], 8)
    engine.add(beam)
    engine.add(waiting, yields=True)  # batch work: behind the beam
    for _ in range(3):
        engine.step()
    assert len(engine.running) == 4 and list(engine.waiting) == [waiting]
    assert engine.cancel(beam.id)
    updates = engine.step()
    assert [(u.sequence, u.token, u.finished) for u in updates if u.sequence is beam] == [(beam, None, True)]
    assert beam.finish_reason == FinishReason.CANCELLED and engine.running == [waiting]
    while engine.has_work:
        engine.step()
    assert waiting.output_ids == greedy_alone(decoder, tiny_tokenizer, [prompts[0]], 8, eos_token_ids=[])[0]


class InjectedFault(RuntimeError):
    """The failure a test plants in a group's own work."""


def fail_third_call(method):
    calls = {"count": 0}

    def failing(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == 3:
            raise InjectedFault("injected")
        return method(*args, **kwargs)

    return failing


@pytest.mark.parametrize("kind", ["beam", "score"])
def test_a_fault_in_a_groups_own_work_fails_it_alone(tiny_int8, tiny_tokenizer, prompts, kind):
    raw = tiny_tokenizer.encode(RAW)
    alone = greedy_alone(tiny_int8, tiny_tokenizer, prompts, 12, eos_token_ids=[])
    if kind == "beam":
        group = beam_group(tiny_int8, raw, 3, 10)
        group.search.advance = fail_third_call(group.search.advance)
    else:
        group = ScoreGroup("score", raw, [tiny_tokenizer.encode(" red, yellow and blue, and more")] * 2,
                           tiny_int8.max_seq_len)
        group.take_fed = fail_third_call(group.take_fed)
    params = SamplingParams(max_tokens=12, temperature=0.0)
    results = run_engine(tiny_int8, tiny_tokenizer, prompts, params, eos_token_ids=[], groups=[group],
                         prefill_chunk=4)
    assert group.finish_reason == FinishReason.FAILED and isinstance(group.error, InjectedFault)
    assert [r.ids for r in results] == alone and all(r.finish_reason == FinishReason.LENGTH for r in results)


def test_a_fork_keeps_a_rows_slot_for_its_first_child_and_copies_the_others_within_the_batch():
    copies = []
    decoder = SimpleNamespace(copy_slot=lambda source, target, length: copies.append((source, target, length)))
    group = SimpleNamespace(prompt_ids=[1, 2, 3], finished=False, row_tokens=lambda: [[10], [11], [12]])
    others = [object(), object()]  # two sequences in slots 0 and 1
    root = GroupRow(group, 2, [])  # the prompt's row, just prefilled
    running, group.rows = [*others, root], [root]
    fork(group, [0, 0, 0], running, decoder)  # the first choice: the group grows at the end of the batch
    assert running[2:] == group.rows and [row.slot for row in group.rows] == [2, 3, 4]
    assert copies == [(2, 3, 3), (2, 4, 3)]  # the prompt's 3 positions
    copies.clear()
    first, second, third = group.rows
    fork(group, [2, 0, 2], running, decoder)  # rows 2 and 0 go on; row 2 forks into row 1's slot; row 1 ends
    assert group.rows == [third, first, second] and [row.slot for row in group.rows] == [4, 2, 3]
    assert copies == [(4, 3, 4)]  # prompt + one token: all that row 2 holds
    assert [row.output_ids for row in group.rows] == [[10], [11], [12]] and running[:2] == others


def test_rows_that_yield_stay_within_their_share_and_a_group_wider_than_it_is_refused(tiny_fp32, tiny_tokenizer,
                                                                                       prompts):
    engine = Engine(tiny_fp32, tiny_tokenizer.backend, [], max_yielding_rows=4)  # 8 rows, 4 for yielding work
    with pytest.raises(ValueError, match="needs 5 rows of the batch, more than the 4"):
        engine.add(beam_group(tiny_fp32, tiny_tokenizer.encode(RAW), 5, 6))
    beam = beam_group(tiny_fp32, tiny_tokenizer.encode(RAW), 3, 12)
    batch = [sequence(tiny_tokenizer, f"batch{i}", prompts[i], 12) for i in range(2)]
    engine.add(beam)
    for job in batch:
        engine.add(job, yields=True)
    engine.step()
    engine.step()
    assert batch[0] in engine.running and list(engine.waiting) == [batch[1]]  # 3 + 1 rows: the share is full
    assert not engine.wants_more() and engine.wants_more(urgent=True)
    interactive = sequence(tiny_tokenizer, "interactive", prompts[2], 4)
    engine.add(interactive)
    engine.step()
    assert interactive in engine.running and list(engine.waiting) == [batch[1]]
