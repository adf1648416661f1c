"""The GPU decoder's bucketed decode step (what CUDA graphs capture), run eagerly on the CPU: padding rows and
padded attention change no real row's tokens, and a decoder whose capture fails decodes eagerly."""

from __future__ import annotations

import pytest
import torch

from shared.sampling import SamplingParams
from tests.engine_helpers import greedy, load_fp32, run_engine, tiny_prompts
from workers.gpu.decoder import CUDADecoder
from workers.gpu.graphs import SMALLEST_LENGTH, StaticDecode, bucket_for, buckets

pytest_plugins = ["tests.engine_fixtures"]
pytestmark = pytest.mark.usefixtures("one_thread")


def load_bucketed(folder, **limits) -> CUDADecoder:
    """The GPU decoder with its decode step bucketed (COMPILE_DECODE), on the CPU: no capture, same shapes."""
    options = {"max_batch_size": 8, "max_seq_len": 256, **limits}
    return CUDADecoder(device="cpu", compile_decode=True, **options).load_weights(folder)


def test_buckets_are_powers_of_two_up_to_the_limit():
    assert buckets(32) == [1, 2, 4, 8, 16, 32]
    assert buckets(24) == [1, 2, 4, 8, 16, 24]
    assert buckets(2048, SMALLEST_LENGTH) == [128, 256, 512, 1024, 2048]
    assert buckets(1) == [1]
    assert [bucket_for(n, buckets(24)) for n in (1, 3, 8, 9, 17, 24)] == [1, 4, 8, 16, 24, 24]
    with pytest.raises(ValueError, match="25 exceeds the largest bucket, 24"):
        bucket_for(25, buckets(24))


def test_a_bucketed_step_gives_the_eager_steps_logits(tiny_dir, tiny_tokenizer):
    prompts = tiny_prompts(tiny_tokenizer)[:3]  # a batch of 3 runs padded to 4
    eager, bucketed = load_fp32(tiny_dir), load_bucketed(tiny_dir)
    assert bucketed.decode_is_compiled and not eager.decode_is_compiled
    for decoder in (eager, bucketed):
        decoder.prefill_many(0, prompts)
    tokens, positions = [5, 6, 7], [len(p) for p in prompts]
    torch.testing.assert_close(bucketed.decode(tokens, positions), eager.decode(tokens, positions),
                               rtol=1e-5, atol=1e-5)


def test_bucketed_decoding_gives_each_sequence_its_own_tokens(tiny_dir, tiny_tokenizer):
    # Batches of every size (padded to 1, 2, 4, 8), lengths crossing the first attention bucket (128).
    prompts = tiny_prompts(tiny_tokenizer)
    long_prompt = tiny_tokenizer.encode("A longer prompt that fills most of a bucket. " * 12)[:120]
    prompts = [*prompts, long_prompt]
    expected = [greedy(load_fp32(tiny_dir), tiny_tokenizer, [p], 24, eos_token_ids=[])[0] for p in prompts]
    assert greedy(load_bucketed(tiny_dir), tiny_tokenizer, prompts, 24, eos_token_ids=[]) == expected


def test_padding_rows_never_touch_the_sequence_being_prefilled(tiny_dir, tiny_tokenizer):
    # Three sequences decode (padded to 4: the padding row is slot 3) while a long prompt is prefilled chunk by
    # chunk into slot 3: its keys must be its own.
    decoder = load_bucketed(tiny_dir)
    short = tiny_prompts(tiny_tokenizer)[:3]
    long_prompt = tiny_tokenizer.encode("Prefilled chunk by chunk beside the running batch. " * 6)[:70]
    params = SamplingParams(max_tokens=20, temperature=0.0)
    seen = []
    results = run_engine(decoder, tiny_tokenizer, [*short, long_prompt], params, eos_token_ids=[], prefill_chunk=8,
                         after_step=lambda engine, step: seen.append((len(engine.running), engine.prefilling)))
    assert any(running == 3 and prefilling is not None for running, prefilling in seen)
    alone = greedy(load_fp32(tiny_dir), tiny_tokenizer, [long_prompt], 20, eos_token_ids=[])[0]
    assert results[3].ids == alone


def test_a_failed_capture_leaves_an_eager_decoder(tiny_dir, tiny_tokenizer, monkeypatch, caplog):
    def broken_capture(self):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(StaticDecode, "capture", broken_capture)
    monkeypatch.setattr(CUDADecoder, "can_capture", property(lambda self: True))
    decoder = load_bucketed(tiny_dir)
    assert not decoder.decode_is_compiled
    assert "decoding eagerly" in caplog.text
    prompts = tiny_prompts(tiny_tokenizer)
    assert greedy(decoder, tiny_tokenizer, prompts, 8, eos_token_ids=[]) == greedy(
        load_fp32(tiny_dir), tiny_tokenizer, prompts, 8, eos_token_ids=[])
