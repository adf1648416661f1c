"""The generation job as it travels through RQ: plain JSON, never pickle.

The API enqueues `JOB_FUNCTION` by its dotted name (so it never imports the workers) with one keyword
argument, `payload`, a `GenerationJob.to_dict()`. Workers rebuild the job with `GenerationJob.from_dict`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from shared.sampling import SamplingParams

JOB_FUNCTION = "workers.jobs.generate"
"""Dotted path RQ records for every generation job; workers that batch read the payload themselves."""


class JobKind(str, enum.Enum):
    """What the worker should do with the prompt."""

    GENERATE = "generate"
    BEAM = "beam"  # beam search, rerank, stream the winner; extra: beam_width, length_penalty, use_rerank, context
    SCORE = "score"  # score given candidates (no generation); extra: candidates, context, length_penalty


@dataclass(frozen=True, slots=True)
class GenerationJob:
    """Everything a worker needs to run one request: token ids and sampling parameters."""

    job_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    kind: JobKind = JobKind.GENERATE
    backend: str = "cpu"
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The JSON payload stored in the RQ job."""
        return {"job_id": self.job_id, "prompt_ids": list(self.prompt_ids), "sampling": self.sampling.to_dict(),
                "kind": self.kind.value, "backend": self.backend, "extra": dict(self.extra)}

    @classmethod
    def from_dict(cls, data: dict) -> GenerationJob:
        """Rebuild a job from its payload (trusted: the API validated it)."""
        sampling = dict(data["sampling"])
        sampling["stop"] = tuple(sampling.get("stop") or ())
        return cls(job_id=data["job_id"], prompt_ids=list(data["prompt_ids"]),
                   sampling=SamplingParams(**sampling), kind=JobKind(data.get("kind", "generate")),
                   backend=data.get("backend", "cpu"), extra=dict(data.get("extra") or {}))
