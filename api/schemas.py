"""The native routes' bodies and answers as pydantic models: they validate requests and, through
`model_json_schema()`, make the OpenAPI document (api/openapi.py), so the two cannot drift."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.sampling import STRICT, SamplingFields

Backend = Literal["gpu", "cpu", "auto"]
FinishReason = Literal["length", "stop", "eos"]

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


class Usage(BaseModel):
    """Token counts of a job."""

    prompt_tokens: int
    completion_tokens: int


class TokenEvent(BaseModel):
    """SSE `token` event: one generated token and its text (possibly empty while a character is incomplete)."""

    token: int
    text: str
    index: int = Field(description="Position in the output, from 0.")


class DoneEvent(BaseModel):
    """SSE `done` event, the last of a successful job."""

    job_id: str
    output_text: str
    output_ids: list[int]
    finish_reason: FinishReason
    usage: Usage


class ErrorDetail(BaseModel):
    """What went wrong; `field` names the request field at fault, when one is."""

    type: str = Field(description="`invalid_request`, `context_length_exceeded`, `not_found`, `no_worker`, "
                                  "`unavailable`, `cancelled`, `job_lost`, `timeout`, `internal_error`, ...")
    message: str
    field: str | None = None


class ErrorBody(BaseModel):
    """Every native error answer, and the SSE `error` event (which has no `field`)."""

    error: ErrorDetail


class GenerationResult(BaseModel):
    """`POST /generate` answer."""

    job_id: str
    input: str = Field(description="The prompt as given.")
    output_ids: list[int] = Field(description="Generated token ids; an EOS token, when generated, is the last.")
    output_text: str
    finish_reason: FinishReason
    usage: Usage
    backend: Literal["gpu", "cpu"]


class JobStatus(BaseModel):
    """`GET /jobs/<id>` answer."""

    job_id: str
    status: str = Field(description="RQ's status: queued, started, finished, failed, canceled, ...")
    backend: str | None = Field(description="The pool the job was sent to (null once RQ forgot the job).")
    events: int = Field(description="Events published so far (the last one's id).")
    result: DoneEvent | None = Field(None, description="Present once the job finished.")
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
