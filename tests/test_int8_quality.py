"""bench.int8_quality's fidelity figures: KL from the reference, same top token, perplexity, and the text."""

from __future__ import annotations

import math

import pytest
import torch

from bench.int8_quality import CONTEXT, REFERENCE, Fidelity, measure, scored_positions, text_chunks
from shared.tokenizer import TextTokenizer

VOCAB = 50


def random_logits(ids: list[int]) -> torch.Tensor:
    """Logits `[len(ids), VOCAB]` that depend only on the ids, as a decoder's would."""
    generator = torch.Generator().manual_seed(sum(ids) * 7919 + len(ids))
    return 4 * torch.randn(len(ids), VOCAB, generator=generator)


def chunk(length: int = 64, seed: int = 0) -> list[int]:
    return torch.randint(VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_only_the_second_half_of_a_chunk_is_scored_as_llama_cpp_does():
    assert scored_positions(CONTEXT) == slice(256, 511)  # position 510 predicts the last token, 511
    fidelity = Fidelity()
    fidelity.add(random_logits(chunk()), random_logits(chunk()), chunk())
    assert fidelity.positions == 31


def test_a_path_against_itself_has_no_divergence():
    results = measure(random_logits, {"same": random_logits}, [chunk(seed=s) for s in range(3)])
    for fidelity in results.values():
        assert fidelity.mean_kl == fidelity.kl_percentile(99) == 0
        assert fidelity.same_top_share == 1
        assert fidelity.perplexity == results[REFERENCE].perplexity


def test_kl_is_the_divergence_of_the_paths_distribution_from_the_references():
    ids = [0, 1] * 8
    halves = torch.zeros(len(ids), 2)  # p = (1/2, 1/2)
    skewed = torch.tensor([[math.log(3), 0.0]]).expand(len(ids), 2)  # q = (3/4, 1/4)
    fidelity = Fidelity()
    fidelity.add(halves, skewed, ids)
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert fidelity.mean_kl == pytest.approx(expected)
    assert fidelity.kl_percentile(99) == pytest.approx(expected)
    # Perplexity is the path's own: the scored targets alternate 1, 0, 1, ... (q = 1/4, 3/4, ...).
    assert fidelity.perplexity == pytest.approx(math.exp(-(4 * math.log(0.25) + 3 * math.log(0.75)) / 7))


def test_perplexity_scores_each_position_against_the_token_that_follows_it():
    ids = chunk()
    oracle = torch.full((len(ids), VOCAB), -30.0)
    oracle[torch.arange(len(ids) - 1), ids[1:]] = 30.0  # certain of the next token
    fidelity = Fidelity()
    fidelity.add(oracle, oracle, ids)
    assert fidelity.perplexity == pytest.approx(1.0)
    uniform = Fidelity()
    uniform.add(oracle, torch.zeros(len(ids), VOCAB), ids)
    assert uniform.perplexity == pytest.approx(VOCAB)
    assert uniform.same_top_share < 0.2  # a flat distribution's argmax is token 0, rarely the oracle's


def test_a_noisier_path_diverges_more_and_loses_top_tokens():
    chunks = [chunk(seed=s) for s in range(4)]

    def noisy(scale: float):
        return lambda ids: random_logits(ids) + scale * torch.randn(len(ids), VOCAB)

    results = measure(random_logits, {"slight": noisy(0.05), "heavy": noisy(2.0)}, chunks)
    slight, heavy = results["slight"], results["heavy"]
    assert 0 < slight.mean_kl < heavy.mean_kl
    assert slight.kl_percentile(99) >= slight.mean_kl
    assert heavy.same_top_share < slight.same_top_share <= 1


def test_the_fixed_text_is_the_same_contiguous_chunks_every_time(tiny_tokenizer_dir):
    tokenizer = TextTokenizer(tiny_tokenizer_dir)
    chunks = text_chunks(tokenizer, chunks=3, context=64)
    assert [len(c) for c in chunks] == [64, 64, 64]
    assert text_chunks(tokenizer, chunks=3, context=64) == chunks
    assert text_chunks(tokenizer, chunks=1, context=192)[0] == sum(chunks, [])
    with pytest.raises(ValueError, match="fewer than"):
        text_chunks(tokenizer, chunks=10**6, context=64)
