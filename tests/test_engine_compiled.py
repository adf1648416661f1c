"""The compiled decode step: one graph for every layer and batch size, and a safe fallback without it."""

from __future__ import annotations

import pytest
import torch

from tests.engine_helpers import greedy, load_int8, tiny_prompts
from workers.engine.kv_cache import KVCache

pytest_plugins = ["tests.engine_fixtures"]
pytestmark = pytest.mark.usefixtures("one_thread")


def test_compiled_decode_serves_new_batch_sizes_and_lengths_without_recompiling(tiny_int8_compiled, tiny_tokenizer):
    prompts = tiny_prompts(tiny_tokenizer)
    frames_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for batch in (3, 5, len(prompts)):  # the warm-up compiled batch 1 and 2; these must reuse batch 2's graph
        greedy(tiny_int8_compiled, tiny_tokenizer, prompts[:batch], 6, eos_token_ids=[])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames_before


def test_a_two_pass_decoder_compiled_beside_a_one_pass_one_runs_its_own_graph(tiny_dir, tiny_int8_compiled,
                                                                               tiny_tokenizer):
    # Same shapes, different arithmetic: sharing the one-pass graph would drop the residual pass.
    two_pass_compiled = load_int8(tiny_dir, compile_decode=True, residual=True)
    assert two_pass_compiled.decode_is_compiled
    prompts = tiny_prompts(tiny_tokenizer)
    two_pass_eager = load_int8(tiny_dir, residual=True)
    assert greedy(two_pass_compiled, tiny_tokenizer, prompts, 8, eos_token_ids=[]) == greedy(
        two_pass_eager, tiny_tokenizer, prompts, 8, eos_token_ids=[])
    logits = {d: d.decode([5, 7], [3, 3]) for d in (tiny_int8_compiled, two_pass_compiled)}
    assert not torch.equal(logits[tiny_int8_compiled], logits[two_pass_compiled])


def test_a_failing_compiler_leaves_a_working_eager_decoder(tiny_dir, tiny_int8, tiny_tokenizer, monkeypatch, caplog):
    def broken_compile(fn, **options):
        def run(*args):
            raise RuntimeError("no C++ compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    decoder = load_int8(tiny_dir, compile_decode=True)
    assert not decoder.decode_is_compiled
    assert "decoding eagerly" in caplog.text
    prompts = tiny_prompts(tiny_tokenizer)
    assert greedy(decoder, tiny_tokenizer, prompts, 8, eos_token_ids=[]) == greedy(
        tiny_int8, tiny_tokenizer, prompts, 8, eos_token_ids=[])


def test_cache_tensors_accept_writes_inside_and_outside_inference_mode():
    cache = KVCache(num_layers=1, max_slots=2, num_kv_heads=1, head_dim=2, max_len=64, dtype=torch.float32,
                    device="cpu", initial_len=4)
    with torch.inference_mode():
        cache.reserve(8)  # grows under inference mode, as a long prefill does
    cache.keys[0][0, 0, 5] = torch.ones(2)
    cache.copy_slot(0, 1, 8)
    assert cache.keys[0][1, 0, 5].tolist() == [1.0, 1.0]
