"""The native routes' bodies and answers as pydantic models: they validate requests and, through
`model_json_schema()`, make the OpenAPI document (api/openapi.py), so the two cannot drift."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.protocol import DoneEvent, ErrorBody, ErrorDetail, FinishReason, ScoreDoneEvent, Usage
from shared.sampling import STRICT, SamplingFields

Backend = Literal["gpu", "cpu", "auto"]

BACKEND_FIELD = Field(None, description="Worker pool: `gpu`, `cpu`, or `auto` (GPU when a GPU worker is live). "
                                        "The server's BACKEND_MODE when left out.")


class GenerationBody(SamplingFields):
    """`POST /generate` and `POST /stream`."""

    model_config = ConfigDict(**STRICT, json_schema_extra={"examples": [{
        "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}]})

    prompt: str = Field(min_length=1, description="Raw text, tokenized as is (no chat template).")
    backend: Backend | None = BACKEND_FIELD


class TextPart(BaseModel):
    """One text part of a message's content (the only kind of part this server takes)."""

    model_config = STRICT

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One turn of a conversation, rendered with the model's chat template."""

    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="`developer` is treated as `system`.")
    content: str | list[TextPart] = Field(description="Text, or a list of text parts that are joined.")
    name: str | None = Field(None, description="Accepted for compatibility; the template does not use it.")

    def as_template_input(self) -> dict:
        """`{"role", "content"}` as chat templates expect it (one string of content)."""
        content = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class GenerationResult(BaseModel):
    """`POST /generate` answer."""

    job_id: str
    input: str = Field(description="The prompt as given.")
    output_ids: list[int] = Field(description="Generated token ids; an EOS token, when generated, is the last.")
    output_text: str
    finish_reason: FinishReason
    usage: Usage
    backend: Literal["gpu", "cpu"]


__all__ = ["DoneEvent", "ErrorBody", "ErrorDetail", "Usage"]  # re-exported: answers share the events' shapes


class JobStatus(BaseModel):
    """`GET /jobs/<id>` answer."""

    job_id: str
    status: str = Field(description="RQ's status: queued, started, finished, failed, canceled, ...")
    backend: str | None = Field(description="The pool the job was sent to (null once RQ forgot the job).")
    events: int = Field(description="Events published so far (the last one's id).")
    result: DoneEvent | ScoreDoneEvent | None = Field(None, description="Present once the job finished (a "
                                                                        "scoring job's has its scores).")
    error: ErrorDetail | None = Field(None, description="Present once the job failed or was cancelled.")


class CancelResult(BaseModel):
    """`DELETE /jobs/<id>` answer."""

    job_id: str
    status: Literal["cancelled", "cancelling", "finished", "failed"]


class Health(BaseModel):
    """`GET /health` answer."""

    status: Literal["ok", "unavailable"]
    redis: bool
    workers: dict[str, int] = Field(description="Live workers per pool.")
