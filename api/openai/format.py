"""A job's output in OpenAI's shapes: whole answers, and stream chunks ending with `data: [DONE]`."""

from __future__ import annotations

import json

from api.errors import error_from_event
from api.openai.models import (
    FINISH_REASONS,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    Completion,
    CompletionChoice,
    CompletionUsage,
)
from shared.events import Event
from shared.protocol import DoneEvent, ErrorBody, TokenEvent, Usage

DONE_FRAME = "data: [DONE]\n\n"
"""The last frame of every OpenAI stream."""


def openai_error(body: dict, status: int) -> dict:
    """A native error body (`{"error": {"type", "message", "field"}}`) in OpenAI's shape."""
    error = body.get("error") or {}
    kind = "requests" if status == 429 else "invalid_request_error" if 400 <= status < 500 else "server_error"
    return {"error": {"message": error.get("message", ""), "type": kind,
                      "param": error.get("field"), "code": error.get("type")}}


def data_frame(payload: dict) -> str:
    """One `data:` frame (OpenAI's streams carry no `event:` or `id:` lines)."""
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def usage(counts: Usage) -> CompletionUsage:
    """OpenAI's usage object from ours."""
    return CompletionUsage(prompt_tokens=counts.prompt_tokens, completion_tokens=counts.completion_tokens,
                           total_tokens=counts.prompt_tokens + counts.completion_tokens)


def finish_reason(done: DoneEvent) -> str:
    """Our `finish_reason` as OpenAI names it."""
    return FINISH_REASONS[done.finish_reason]


class TextCompletionView:
    """`text_completion` objects for one job."""

    def __init__(self, job_id: str, model: str, created: int):
        self.base = {"id": f"cmpl-{job_id}", "created": created, "model": model}

    def opening(self) -> list[dict]:
        """Chunks sent before the first token (none)."""
        return []

    def chunk(self, text: str, finish: str | None = None) -> dict:
        """A chunk adding `text` (and, in the last one, the finish reason)."""
        return Completion(**self.base, choices=[CompletionChoice(text=text, finish_reason=finish)]).model_dump()

    def usage_chunk(self, counts: Usage) -> dict:
        """The chunk `stream_options.include_usage` asks for: no choices, the usage."""
        return Completion(**self.base, choices=[], usage=usage(counts)).model_dump()

    def whole(self, done: DoneEvent) -> dict:
        """The non-streamed answer."""
        choice = CompletionChoice(text=done.output_text, finish_reason=finish_reason(done))
        return Completion(**self.base, choices=[choice], usage=usage(done.usage)).model_dump()


class ChatCompletionView:
    """`chat.completion` objects (and `chat.completion.chunk`s) for one job."""

    def __init__(self, job_id: str, model: str, created: int):
        self.base = {"id": f"chatcmpl-{job_id}", "created": created, "model": model}

    def opening(self) -> list[dict]:
        """The first chunk names the role, as OpenAI's does."""
        return [self._chunk(ChatDelta(role="assistant", content=""))]

    def chunk(self, text: str, finish: str | None = None) -> dict:
        """A chunk adding `text` to the reply (the last one: an empty delta and the finish reason)."""
        return self._chunk(ChatDelta(content=text) if text else ChatDelta(), finish)

    def usage_chunk(self, counts: Usage) -> dict:
        """The chunk `stream_options.include_usage` asks for: no choices, the usage."""
        return ChatCompletionChunk(**self.base, choices=[], usage=usage(counts)).model_dump()

    def whole(self, done: DoneEvent) -> dict:
        """The non-streamed answer."""
        choice = ChatChoice(message=AssistantMessage(content=done.output_text), finish_reason=finish_reason(done))
        return ChatCompletion(**self.base, choices=[choice], usage=usage(done.usage)).model_dump()

    def _chunk(self, delta: ChatDelta, finish: str | None = None) -> dict:
        return ChatCompletionChunk(**self.base, choices=[ChatChunkChoice(delta=delta, finish_reason=finish)]
                                   ).model_dump()


class ChunkEncoder:
    """`api.jobs.sse.Encoder` writing a job's events as OpenAI stream chunks, then `data: [DONE]`."""

    def __init__(self, view: TextCompletionView | ChatCompletionView, include_usage: bool):
        self.view = view
        self.include_usage = include_usage
        self.opened = False

    def event(self, event: Event) -> str:
        """Frames for one job event: a token's text, or the closing chunks; "" for a token without text."""
        frames = "" if self.opened else "".join(data_frame(chunk) for chunk in self.view.opening())
        self.opened = True
        if event.type == "token":
            text = TokenEvent.model_validate(event.data).text
            return frames + (data_frame(self.view.chunk(text)) if text else "")
        if event.type == "done":
            done = DoneEvent.model_validate(event.data)
            frames += data_frame(self.view.chunk("", finish_reason(done)))
            if self.include_usage:
                frames += data_frame(self.view.usage_chunk(done.usage))
            return frames + DONE_FRAME
        if event.type == "error":
            error = error_from_event(ErrorBody.model_validate(event.data))
            return frames + data_frame(openai_error(error.to_dict(), error.status)) + DONE_FRAME
        return frames

    def failure(self, error_type: str, message: str) -> str:
        """An error chunk the API makes itself, then [DONE]."""
        return data_frame(openai_error({"error": {"type": error_type, "message": message}}, 503)) + DONE_FRAME
