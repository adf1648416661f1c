"""Bodies and answers of the conversation routes (`/chat`, `/stream_chat_beam`, `/rerank_scores`).

A conversation is given either as plain strings (user and assistant turns alternating, the user first) or
as `{role, content}` objects (an optional first `system` message, then user and assistant turns
alternating from the user). Shapes are checked here, so every route refuses the same conversations with
the same 400 naming the message at fault; rendering and fitting it to the context is `api.prompts`.
`ChatMessage` is the other shape a conversation comes in: OpenAI's messages (/v1/chat/completions, /tokenize).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

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

MAX_BEAM_WIDTH = 8
"""Widest beam search, and most candidates /rerank_scores takes (each is a row of the worker's private cache)."""

TRUNCATION = ("When the rendered conversation plus the tokens asked for does not fit the context, the oldest "
              "user/assistant pairs are dropped until it does; the system message and the last user turn (with "
              "anything after it) are always kept, and the `X-Messages-Dropped` response header says how many "
              "messages were dropped (0 when none). If even those do not fit, the answer is a 400 "
              "`context_length_exceeded`.")
"""How every conversation route fits a long history into the context (also said in the README)."""


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be blank")
    return text


TurnText = Annotated[str, Field(min_length=1, json_schema_extra={"pattern": r"\S"}), AfterValidator(_not_blank)]
"""A turn's content: text with at least one non-blank character (the pattern states `_not_blank`)."""


class ChatTurn(BaseModel):
    """One turn of a conversation as an object."""

    model_config = STRICT

    role: Literal["system", "user", "assistant"] = Field(
        description="`system` only as the first message; then `user` and `assistant` alternate, the user first.")
    content: TurnText


def _message_form(value) -> str | None:
    """Which form a message is in (`str` or `dict`): pydantic's tag, which leaves error paths clean."""
    if isinstance(value, str):
        return "str"
    return "dict" if isinstance(value, dict | ChatTurn) else None


Message = Annotated[
    Annotated[TurnText, Tag("str")] | Annotated[ChatTurn, Tag("dict")],
    Discriminator(_message_form, custom_error_type="message_form",
                  custom_error_message="must be a string or an object with 'role' and 'content'"),
]

MESSAGES_DESCRIPTION = (
    "The conversation, rendered with the model's own chat template: plain strings alternating user / assistant "
    "turns, the user first (`[\"Hello\", \"Hi! How can I help?\", \"Tell me a story.\"]`), or `{role, content}` "
    "objects (an optional first `system` message, then `user` and `assistant` alternating from the user). "
    "The two forms cannot be mixed. " + TRUNCATION)


ONE_FORM = {"anyOf": [{"items": {"type": "string"}}, {"items": {"type": "object"}}]}
"""Every message a string, or every one an object: the first rule of `check_conversation`, in JSON Schema. (Its
other rule, the order of roles, has no JSON Schema: user and assistant alternate for any length.)"""


class ConversationBody(BaseModel):
    """The `messages` field every conversation route takes, with its shape rules."""

    model_config = STRICT

    messages: list[Message] = Field(min_length=1, description=MESSAGES_DESCRIPTION,
                                    json_schema_extra=ONE_FORM)

    @model_validator(mode="after")
    def _well_formed(self):
        check_conversation(self.messages)
        return self

    def turns(self) -> list[dict]:
        """`{"role", "content"}` dicts as chat templates expect them (strings get their roles by position)."""
        return [{"role": "user" if index % 2 == 0 else "assistant", "content": message}
                if isinstance(message, str) else {"role": message.role, "content": message.content}
                for index, message in enumerate(self.messages)]


def check_conversation(messages: list[str | ChatTurn]) -> None:
    """Refuse a conversation that mixes the two forms or whose roles are out of order (400 naming the message)."""
    first_is_text = isinstance(messages[0], str)
    for index, message in enumerate(messages):
        if isinstance(message, str) != first_is_text:
            forms = ("an object", "a string") if first_is_text else ("a string", "an object")
            raise ValidationError(f"'messages[{index}]' is {forms[0]} but 'messages[0]' is {forms[1]}: give every "
                                  "message as a string, or every one as a {role, content} object", field="messages")
    if not first_is_text:
        check_roles([message.role for message in messages])


def check_roles(roles: list[str]) -> None:
    """An optional first `system`, then `user` and `assistant` alternating from the user, at least one user turn."""
    start = 1 if roles[0] == "system" else 0
    if start == len(roles):
        raise ValidationError("'messages' has only a system message: add a user turn after it", field="messages")
    for index in range(start, len(roles)):
        expected = "user" if (index - start) % 2 == 0 else "assistant"
        if roles[index] != expected:
            rule = ("only the first message may be 'system'" if roles[index] == "system"
                    else "user and assistant turns alternate, the user first")
            raise ValidationError(f"'messages[{index}].role' must be '{expected}' ({rule}), got '{roles[index]}'",
                                  field="messages")


LengthPenalty = Annotated[float, Field(ge=-5.0, le=5.0, description=(
    "Exponent of the length normalisation: a candidate's score is its summed log-probability divided by "
    "`len(tokens) ** length_penalty` (above 0 favours longer answers, below 0 shorter ones)."))]

CONTEXT_NOTE = ("The reranker judges relevance to the conversation as text (`role: content` lines, newest last); "
                "its embedding model reads at most 256 tokens and keeps the newest part.")
"""What the reranker compares candidates with (the `context` of BEAM and SCORE jobs)."""


class ChatBody(ConversationBody, SamplingFields):
    """`POST /chat`."""

    model_config = ConfigDict(**STRICT, json_schema_extra={"examples": [{
        "messages": ["What is the capital of France?"], "max_tokens": 32, "temperature": 0}]})

    backend: Backend | None = BACKEND_FIELD
    queue_deadline_s: QueueDeadline | None = QUEUE_DEADLINE_FIELD


class BeamBody(ConversationBody):
    """`POST /stream_chat_beam`: beam search (deterministic; no sampling fields), then an optional rerank."""

    model_config = ConfigDict(**STRICT, json_schema_extra={"examples": [{
        "messages": ["What is the capital of France?"], "beam_width": 4, "max_tokens": 32}]})

    beam_width: int = Field(4, ge=1, le=MAX_BEAM_WIDTH, description="Beams kept at each step; each finished "
                                                                     "beam is a candidate.")
    max_tokens: MaxTokens | None = None
    length_penalty: LengthPenalty = 1.0
    use_rerank: bool = Field(True, description="Let the reranker pick the winner (relevance and LM score "
                                               "combined); false streams the best beam. " + CONTEXT_NOTE)
    backend: Backend | None = BACKEND_FIELD
    queue_deadline_s: QueueDeadline | None = QUEUE_DEADLINE_FIELD


class RerankBody(ConversationBody):
    """`POST /rerank_scores`: score given answers to the conversation, without generating."""

    model_config = ConfigDict(**STRICT, json_schema_extra={"examples": [{
        "messages": ["What is the capital of France?"],
        "candidates": ["The capital of France is Paris.", "I like turtles."]}]})

    candidates: list[Annotated[str, Field(min_length=1)]] = Field(
        min_length=1, max_length=MAX_BEAM_WIDTH, description="Answers to score, as the assistant's next turn. "
                                                             + CONTEXT_NOTE)
    length_penalty: LengthPenalty = 1.0
    backend: Backend | None = BACKEND_FIELD
    queue_deadline_s: QueueDeadline | None = QUEUE_DEADLINE_FIELD


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
