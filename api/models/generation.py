"""`/generate` and `/stream`: the body they take and the answer /generate gives."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from api.models.fields import BACKEND_FIELD, QUEUE_DEADLINE_FIELD, STRICT, Backend, QueueDeadline, SamplingFields
from shared.protocol import DoneEvent, FinishReason, Usage


class GenerationBody(SamplingFields):
    """`POST /generate` and `POST /stream`."""

    model_config = ConfigDict(**STRICT, json_schema_extra={"examples": [{
        "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}]})

    prompt: str = Field(min_length=1, description="Raw text, tokenized as is (no chat template).")
    backend: Backend | None = BACKEND_FIELD
    queue_deadline_s: QueueDeadline | None = QUEUE_DEADLINE_FIELD


class GenerationResult(BaseModel):
    """`POST /generate` answer (also each result of a batch)."""

    job_id: str
    input: str = Field(description="The prompt as given.")
    output_ids: list[int] = Field(description="Generated token ids; an EOS token, when generated, is the last.")
    output_text: str
    finish_reason: FinishReason
    usage: Usage
    backend: Literal["gpu", "cpu"]

    @classmethod
    def of(cls, prompt: str, backend: str, done: DoneEvent) -> GenerationResult:
        """The answer for `prompt` from its job's `done` event."""
        return cls(job_id=done.job_id, input=prompt, output_ids=done.output_ids, output_text=done.output_text,
                   finish_reason=done.finish_reason, usage=done.usage, backend=backend)
