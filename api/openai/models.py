"""OpenAI-compatible bodies and answers (`/v1/completions`, `/v1/chat/completions`, `/v1/models`).

The sampling fields are the native ones (`SamplingFields`), so both kinds of route validate alike.
Fields of OpenAI's API that this server cannot honour are either absent (a 400 names them as unknown) or,
where clients commonly send the neutral value (`n: 1`, `presence_penalty: 0`), accepted only with it.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from api.models.conversation import ChatMessage
from api.models.fields import (
    BACKEND_FIELD,
    QUEUE_DEADLINE_FIELD,
    STRICT,
    Backend,
    MaxTokens,
    QueueDeadline,
    SamplingFields,
)
from shared.exceptions import ValidationError

OpenAIFinishReason = Literal["stop", "length"]

FINISH_REASONS: dict[str, OpenAIFinishReason] = {"eos": "stop", "stop": "stop", "length": "length"}
"""Our finish reasons -> OpenAI's: the end-of-sequence token and a stop sequence are both `stop`."""


STREAM_OPTIONS_NEED_STREAM = [{"properties": {"stream_options": {"type": "null"}}},
                              {"required": ["stream"], "properties": {"stream": {"const": True}}}]
"""`stream_options` absent or null, or `stream` true: `_stream_options_need_stream` in JSON Schema."""


def neutral_only(neutral, description: str):
    """A field of OpenAI's API this server takes only at its neutral value, or null (`_neutral` checks it);
    the document says so with an `enum`."""
    return Field(None, description=description, json_schema_extra={"enum": list(dict.fromkeys([neutral, None]))})


def _only(model: type[BaseModel], value, info):
    """Accept a `neutral_only` field only at its neutral value (or null)."""
    neutral = model.model_fields[info.field_name].json_schema_extra["enum"][0]
    if value is not None and value != neutral:
        raise ValueError(f"must be {json.dumps(neutral)} or left out: this server supports no other value")
    return value


class StreamOptions(BaseModel):
    """Options of a streamed answer."""

    model_config = STRICT

    include_usage: bool = Field(False, description="Send a last chunk with `usage` (and no choices) before [DONE].")


class OpenAIRequest(SamplingFields):
    """Fields common to completions and chat completions."""

    model_config = STRICT

    model: str | None = Field(None, description="The served model's id (GET /v1/models); left out means it.")
    stream: bool = Field(False, description="Answer with server-sent chunks, ending with `data: [DONE]`.")
    stream_options: StreamOptions | None = None
    n: int | None = neutral_only(1, "Choices per request: only 1.")
    presence_penalty: float | None = neutral_only(0, "Only 0 (use `repetition_penalty`).")
    frequency_penalty: float | None = neutral_only(0, "Only 0 (use `repetition_penalty`).")
    user: str | None = Field(None, description="Accepted and ignored.")
    backend: Backend | None = BACKEND_FIELD
    queue_deadline_s: QueueDeadline | None = QUEUE_DEADLINE_FIELD

    @field_validator("n", "presence_penalty", "frequency_penalty")
    @classmethod
    def _neutral(cls, value, info):
        return _only(cls, value, info)

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValidationError("'stream_options' is only allowed when 'stream' is true", field="stream_options")
        return self

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema, handler):
        """The document states `_stream_options_need_stream` (and each subclass inherits it)."""
        schema = handler.resolve_ref_schema(handler(core_schema))
        schema["anyOf"] = STREAM_OPTIONS_NEED_STREAM
        return schema


class CompletionRequest(OpenAIRequest):
    """`POST /v1/completions`."""

    model_config = ConfigDict(**STRICT, json_schema_extra={"examples": [{
        "model": "SmolLM2-135M-Instruct.Q4_1", "prompt": "The capital of France is", "max_tokens": 16}]})

    prompt: str = Field(min_length=1, description="One prompt, as text (lists and token arrays are not supported).")
    echo: bool | None = neutral_only(False, "Only false.")
    logprobs: int | None = neutral_only(None, "Only null: log-probabilities are not returned.")
    best_of: int | None = neutral_only(1, "Only 1.")

    @field_validator("echo", "logprobs", "best_of")
    @classmethod
    def _neutral_completion(cls, value, info):
        return _only(cls, value, info)


class ChatCompletionRequest(OpenAIRequest):
    """`POST /v1/chat/completions`: the messages are rendered with the model's chat template."""

    model_config = ConfigDict(**STRICT, json_schema_extra={"examples": [{
        "model": "SmolLM2-135M-Instruct.Q4_1", "messages": [{"role": "user", "content": "Say hello."}],
        "max_completion_tokens": 32, "stream": True}]})

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: MaxTokens | None = Field(None, description="Same as max_tokens (give one of the two).")
    logprobs: bool | None = neutral_only(False, "Only false.")

    @field_validator("logprobs")
    @classmethod
    def _neutral_chat(cls, value, info):
        return _only(cls, value, info)

    @model_validator(mode="after")
    def _one_max_tokens(self):
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValidationError("give 'max_completion_tokens' or 'max_tokens', not both",
                                  field="max_completion_tokens")
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self


class CompletionUsage(BaseModel):
    """Token counts."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    """A completion's text (in a chunk: the new text)."""

    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: OpenAIFinishReason | None = None


class Completion(BaseModel):
    """`/v1/completions` answer, and each chunk of its stream (same object type, as in OpenAI's API)."""

    id: str = Field(description="`cmpl-` and the job id.")
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None


class AssistantMessage(BaseModel):
    """The generated reply."""

    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    """A chat completion's reply."""

    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: OpenAIFinishReason


class ChatCompletion(BaseModel):
    """`/v1/chat/completions` answer."""

    id: str = Field(description="`chatcmpl-` and the job id.")
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: CompletionUsage


class ChatDelta(BaseModel):
    """What a chunk adds to the reply: the role (first chunk), then content; `{}` in the last."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _leave_out_unset(self, handler):
        return {key: value for key, value in handler(self).items() if value is not None}


class ChatChunkChoice(BaseModel):
    """One choice of a chunk."""

    index: int = 0
    delta: ChatDelta
    logprobs: None = None
    finish_reason: OpenAIFinishReason | None = None


class ChatCompletionChunk(BaseModel):
    """One chunk of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: CompletionUsage | None = None


class ModelCard(BaseModel):
    """The served model."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    """`/v1/models` answer."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIErrorDetail(BaseModel):
    """OpenAI's error object; `code` is this server's error type (`context_length_exceeded`, `no_worker`...)."""

    message: str
    type: str = Field(description="`invalid_request_error` for 4xx answers, `server_error` for 5xx.")
    param: str | None = Field(description="The request field at fault, when one is.")
    code: str | None


class OpenAIErrorBody(BaseModel):
    """Every error answer under /v1, and an `error` chunk ending a stream that failed."""

    error: OpenAIErrorDetail
