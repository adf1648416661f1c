"""`/generate_batch` and `/batches/<id>`: the body and the answers."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from api.models.fields import (
    BACKEND_FIELD,
    QUEUE_DEADLINE_FIELD,
    STRICT,
    Backend,
    QueueDeadline,
    SamplingFields,
    server_limits,
)
from api.models.generation import GenerationResult
from shared.protocol import ErrorBody


class BatchBody(SamplingFields):
    """`POST /generate_batch`: prompts that share the sampling fields."""

    model_config = ConfigDict(**STRICT, json_schema_extra={"examples": [{
        "prompts": ["The capital of France is", "The largest planet is"], "max_tokens": 16, "temperature": 0}]})

    prompts: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1, description=(
        "Raw texts, tokenized as /generate tokenizes a prompt; at most MAX_BATCH_PROMPTS (64 by default). Each "
        "must fit the context with max_tokens, or the whole request is a 400 naming it (`prompts[i]`)."),
        json_schema_extra=server_limits(maxItems="max_batch_prompts"))
    backend: Backend | None = BACKEND_FIELD
    queue_deadline_s: QueueDeadline | None = QUEUE_DEADLINE_FIELD
    wait: bool = Field(True, description="Answer once every prompt is done (200), or at once (202) with the "
                                         "batch's id to poll at GET /batches/<id>.")


class BatchProgress(BaseModel):
    """How many of the batch's prompts have ended (successfully or not)."""

    done: int
    total: int


class BatchAccepted(BaseModel):
    """`POST /generate_batch` answer with `wait: false`."""

    batch_id: str
    status: Literal["running"]
    total: int


class BatchStatus(BaseModel):
    """A batch's results in the prompts' order: what /generate answers, an error, or null while running."""

    batch_id: str
    status: Literal["running", "done"]
    progress: BatchProgress
    results: list[GenerationResult | ErrorBody | None] = Field(description=(
        "One slot per prompt: its /generate answer, `{\"error\": {...}}` when its job failed (the others "
        "still complete), or null while it is queued or running."))
