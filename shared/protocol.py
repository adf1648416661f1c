"""What the API and the workers say to each other through Redis, defined once: the job payload and every event.

The API builds a `GenerationJob` and enqueues `job.model_dump(mode="json")`; a worker rebuilds it with
`GenerationJob.model_validate`. The worker builds each event as one of the models below and publishes it
(`shared.events`); the API reads an event's `data` back with the same model, relays it, and documents it in
OpenAPI from the same class (`EVENTS_BY_KIND`). Tests build events with these models too, so a field added on
one side cannot be forgotten on the other.
"""

from __future__ import annotations

import enum
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.sampling import SamplingParams

JOB_FUNCTION = "workers.jobs.generate"
"""Dotted path RQ records for every job; the API enqueues it by name, so it never imports the workers."""

FinishReason = Literal["length", "stop", "eos"]
"""Why a successful job ended: max_tokens reached, a stop sequence, or the model's end-of-sequence token."""


# -- the job ---------------------------------------------------------------------------------------------


class JobKind(str, enum.Enum):
    """What the worker should do with the prompt."""

    GENERATE = "generate"
    BEAM = "beam"  # beam search, rerank, stream the winner
    SCORE = "score"  # score given candidates, no generation


class BeamOptions(BaseModel):
    """A BEAM job's parameters."""

    model_config = ConfigDict(frozen=True)

    beam_width: int = 4
    length_penalty: float = 1.0
    use_rerank: bool = True
    context: str = Field("", description="The conversation as text, for the reranker.")


class ScoreOptions(BaseModel):
    """A SCORE job's parameters."""

    model_config = ConfigDict(frozen=True)

    candidates: list[str] = Field(min_length=1)
    length_penalty: float = 1.0
    context: str = Field("", description="The conversation as text, for the reranker.")


class GenerationJob(BaseModel):
    """Everything a worker needs to run one request; travels as plain JSON in the RQ job, never pickle."""

    model_config = ConfigDict(frozen=True)

    job_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    kind: JobKind = JobKind.GENERATE
    backend: str = "cpu"
    beam: BeamOptions | None = None
    score: ScoreOptions | None = None
    queue_deadline_s: float | None = Field(None, description="Seconds the job may wait in its queue before it "
                                                             "fails instead of starting (None: no deadline).")


# -- the events of a job's stream ------------------------------------------------------------------------


class JobEvent(BaseModel):
    """Base of every event; `event_type` is the SSE `event:` name it travels under."""

    event_type: ClassVar[str]
    terminal: ClassVar[bool] = False


class TokenEvent(JobEvent):
    """`token`: one generated token and its text (possibly empty while a character is incomplete)."""

    event_type: ClassVar[str] = "token"

    token: int
    text: str
    index: int = Field(description="Position in the output, from 0.")


class Usage(BaseModel):
    """Token counts of a job."""

    prompt_tokens: int
    completion_tokens: int


class DoneEvent(JobEvent):
    """`done`: the last event of a successful generation."""

    event_type: ClassVar[str] = "done"
    terminal: ClassVar[bool] = True

    job_id: str
    output_text: str
    output_ids: list[int] = Field(description="Generated token ids; an EOS token, when generated, is the last.")
    finish_reason: FinishReason
    usage: Usage


class BeamCandidate(BaseModel):
    """One finished beam and its scores."""

    index: int = Field(description="Rank by beam score, best first.")
    text: str
    beam_score: float = Field(description="Length-normalised log-probability.")
    rerank_score: float | None = Field(description="Cosine similarity to the context; null without rerank.")
    combined_score: float = Field(description="What the winner was chosen by (the beam score without rerank).")


class CandidatesEvent(JobEvent):
    """`candidates`: every beam of a beam search, before the winner's tokens are streamed."""

    event_type: ClassVar[str] = "candidates"

    candidates: list[BeamCandidate]
    winner: int = Field(description="Index of the candidate whose tokens follow.")
    use_rerank: bool


class BeamDoneEvent(DoneEvent):
    """`done` of a beam search: the winner's output."""

    winner: int


class ScoredCandidate(BaseModel):
    """One given candidate's scores."""

    index: int
    text: str
    lm_score: float = Field(description="Length-normalised log-probability of the candidate after the prompt.")
    rerank_score: float = Field(description="Cosine similarity to the context.")
    combined_score: float


class ScoreDoneEvent(JobEvent):
    """`done` of a scoring job (its only event): every candidate's scores and the winner."""

    event_type: ClassVar[str] = "done"
    terminal: ClassVar[bool] = True

    job_id: str
    candidates: list[ScoredCandidate]
    winner: int = Field(description="Index of the candidate with the best combined score.")


class ErrorDetail(BaseModel):
    """What went wrong; `field` names the request field at fault, when one is."""

    type: str = Field(description="`invalid_request`, `context_length_exceeded`, `not_found`, `no_worker`, "
                                  "`unavailable`, `cancelled`, `invalid_job`, `job_lost`, `timeout`, "
                                  "`internal_error`, ...")
    message: str
    field: str | None = Field(None, exclude_if=lambda value: value is None)


class ErrorBody(JobEvent):
    """`error`: the last event of a job that failed or was cancelled; also every native HTTP error answer."""

    event_type: ClassVar[str] = "error"
    terminal: ClassVar[bool] = True

    error: ErrorDetail

    @classmethod
    def of(cls, error_type: str, message: str) -> ErrorBody:
        """An error event of `error_type`."""
        return cls(error=ErrorDetail(type=error_type, message=message))


EVENTS_BY_KIND: dict[JobKind, dict[str, type[JobEvent]]] = {
    JobKind.GENERATE: {"token": TokenEvent, "done": DoneEvent, "error": ErrorBody},
    JobKind.BEAM: {"candidates": CandidatesEvent, "token": TokenEvent, "done": BeamDoneEvent, "error": ErrorBody},
    JobKind.SCORE: {"done": ScoreDoneEvent, "error": ErrorBody},
}
"""The events each kind of job publishes, by SSE name, in the order they come."""


def _events_of_any_kind() -> dict[str, tuple[type[JobEvent], ...]]:
    events: dict[str, tuple[type[JobEvent], ...]] = {}
    for by_name in EVENTS_BY_KIND.values():
        for name, model in by_name.items():
            if model not in events.setdefault(name, ()):
                events[name] += (model,)
    return events


ANY_JOB_EVENTS = _events_of_any_kind()
"""The events a stream of a job of any kind may carry, by SSE name (a resumed stream does not know the kind)."""

TERMINAL_EVENTS = frozenset(name for events in EVENTS_BY_KIND.values()
                            for name, model in events.items() if model.terminal)
"""Event types after which a job publishes nothing more."""
