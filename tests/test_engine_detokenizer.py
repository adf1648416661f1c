"""Incremental detokenisation and stop sequences: what a stream shows, token by token.

The deltas of a sequence must concatenate to exactly its final text, never end in half of a multi-byte
character, and never show text that turns out to be (the start of) a stop sequence.
"""

from __future__ import annotations

import pytest

from shared.sampling import SamplingParams
from shared.tokenizer import TextTokenizer
from tests.engine_helpers import ScriptedDecoder, run_engine
from workers.engine.detokenizer import IncrementalDetokenizer, StopFilter
from workers.engine.sequence import FinishReason

pytest_plugins = ["tests.engine_fixtures"]
pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = [
    "Café naïve — déjà vu, señor.",
    "Emoji: 😀👍🏽 and a family 👨‍👩‍👧 in one go.",
    "日本語のテキストと中文。",
    "Ελληνικά και русский, ñ ü ß € 🚀 end",
]
STORY = "Le café était prêt. Voilà 😀 — naïve 🚀 fin. Merci!"


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir) -> TextTokenizer:
    return TextTokenizer(tiny_tokenizer_dir)


def stream(tokenizer: TextTokenizer, ids: list[int]) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer.backend)
    return [detokenizer.add(token) for token in ids]


# -- IncrementalDetokenizer ------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_the_text_and_hold_back_partial_characters(tokenizer, text):
    ids = tokenizer.encode(text)
    deltas = stream(tokenizer, ids)
    assert "".join(deltas) == text == tokenizer.decode(ids)
    assert not any("\ufffd" in delta for delta in deltas)  # no half character was ever shown
    partial = any("\ufffd" in tokenizer.decode([token]) for token in ids)
    assert ("" in deltas) == partial  # a character split over tokens waited for all of them


def test_special_tokens_in_the_output_are_skipped_like_decode_skips_them(tokenizer):
    im_start = tokenizer.backend.token_to_id("<|im_start|>")
    ids = tokenizer.encode("Hello") + [im_start] + tokenizer.encode(" wörld 😀")
    assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids) == "Hello wörld 😀"


# -- StopFilter ------------------------------------------------------------------------------------------


def test_stop_filter_without_stops_passes_text_through():
    stops = StopFilter()
    assert [stops.push(d) for d in ("a", "b#", "#c")] == ["a", "b#", "#c"] and not stops.stopped


def test_text_that_may_start_a_stop_is_held_back_until_it_cannot():
    stops = StopFilter(("###",))
    assert stops.push("Hello #") == "Hello "
    assert stops.push("#") == ""
    assert stops.push("x") == "##x"
    assert not stops.stopped


def test_a_stop_split_over_deltas_ends_the_text_before_it():
    stops = StopFilter(("</s>",))
    emitted = [stops.push(d) for d in ("ab", "c<", "/s", ">tail")]
    assert "".join(emitted) == "abc" == stops.text and stops.stopped


def test_the_earliest_stop_wins_and_text_after_it_in_the_same_delta_is_dropped():
    stops = StopFilter(("END", "bar"))
    assert stops.push("foo bar baz END") == "foo " and stops.stopped


def test_a_stop_at_the_very_start_emits_nothing():
    stops = StopFilter(("STOP",))
    assert stops.push("ST") == "" and stops.push("OP and more") == "" and stops.stopped and stops.text == ""


def test_flush_releases_held_back_text_at_the_end():
    stops = StopFilter(("end of story",))
    assert stops.push("the end of") == "the "
    assert stops.flush() == "end of"


# -- through the engine, with known token ids ------------------------------------------------------------


def run_script(tokenizer: TextTokenizer, text: str, stop: tuple[str, ...] = (), max_tokens: int = 200):
    script = tokenizer.encode(text)
    decoder = ScriptedDecoder(script, tokenizer.vocab_size, tokenizer.eos_token_ids[0])
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=stop)
    prompt = tokenizer.encode("Say something.")
    return script, run_engine(decoder, tokenizer, [prompt], params)[0]


def test_engine_deltas_are_whole_characters_and_add_up_to_the_text(tokenizer):
    script, result = run_script(tokenizer, STORY)
    assert result.ids == script + tokenizer.eos_token_ids[:1] and result.finish_reason == FinishReason.EOS
    assert result.text == result.output_text == STORY == tokenizer.decode(result.ids)
    assert not any("\ufffd" in delta for delta in result.deltas)
    assert len(result.deltas) == len(result.ids)  # one update per token, some of them empty


def test_engine_never_streams_the_stop_sequence_or_its_start(tokenizer):
    stop = "naïve 🚀"
    script, result = run_script(tokenizer, STORY, stop=(stop,))
    assert result.finish_reason == FinishReason.STOP
    assert result.text == result.output_text == STORY[: STORY.index(stop)]
    assert len(result.ids) < len(script)  # nothing after the token completing the stop was generated


def test_engine_releases_a_near_miss_once_it_cannot_be_the_stop(tokenizer):
    near_miss = "naïve X"  # STORY has "naïve 🚀": the filter must wait until the emoji arrives
    _, result = run_script(tokenizer, STORY, stop=(near_miss,))
    assert result.finish_reason == FinishReason.EOS and result.text == STORY
    shown, waited = "", False
    for index, delta in enumerate(result.deltas):
        shown += delta
        generated = tokenizer.decode(result.ids[: index + 1])
        waited |= "naïve" in generated and "naïve" not in shown
    assert waited


def test_engine_stop_cut_inside_a_multi_byte_character_run(tokenizer):
    stop = "😀"
    _, result = run_script(tokenizer, STORY, stop=(stop,))
    assert result.finish_reason == FinishReason.STOP and result.text == STORY[: STORY.index(stop)]


def test_engine_length_end_flushes_held_back_text(tokenizer):
    script = tokenizer.encode(STORY)
    cut = next(i for i in range(1, len(script)) if tokenizer.decode(script[:i]).endswith(" na"))
    _, result = run_script(tokenizer, STORY, stop=("naïve 🚀",), max_tokens=cut)
    assert result.finish_reason == FinishReason.LENGTH
    assert result.text == tokenizer.decode(script[:cut])  # " na" was held back, then released at the end


def test_sampled_tiny_model_output_streams_exactly_its_decoded_text(tiny_fp32, tiny_tokenizer):
    # Sampling hot over the whole vocabulary draws many byte-level tokens that are only parts of a character.
    prompts = [tiny_tokenizer.encode(text) for text in TEXTS]
    params = [SamplingParams(max_tokens=48, temperature=1.5, seed=seed) for seed in range(len(prompts))]
    results = run_engine(tiny_fp32, tiny_tokenizer, prompts, params, eos_token_ids=[])
    partial_tokens = 0
    for result in results:
        decoded = tiny_tokenizer.decode(result.ids)
        partial_tokens += sum("\ufffd" in tiny_tokenizer.decode([token]) for token in result.ids)
        assert result.text == result.output_text
        if decoded.endswith("\ufffd"):  # the last character never completed: it is held back, not shown
            assert decoded.startswith(result.text)
        else:
            assert result.text == decoded
        assert not any(delta.endswith("\ufffd") for delta in result.deltas)
    assert partial_tokens > 0
