"""`/tokenize` and `/detokenize`: bodies and answers."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from api.models.conversation import ChatMessage
from api.models.fields import STRICT, server_limits
from shared.exceptions import ValidationError

EXACTLY_ONE = {"oneOf": [
    {"required": ["text"], "properties": {"text": {"type": "string"}, "messages": {"type": "null"}}},
    {"required": ["messages"], "properties": {"messages": {"type": "array"}, "text": {"type": "null"}}},
]}
"""`_exactly_one` in JSON Schema: `text` or `messages` given (and not null), the other absent or null."""

TokenId = Annotated[int, Field(json_schema_extra={"minimum": 0, **server_limits(exclusiveMaximum="vocabulary_size")})]
"""A token id; the bounds are the route's check (its 400 names the id), stated for the document."""


class TokenizeBody(BaseModel):
    """Text to tokenize as is, or messages to render with the chat template first (exactly one of the two)."""

    model_config = ConfigDict(**STRICT, json_schema_extra=EXACTLY_ONE)

    text: str | None = Field(None, description="Raw text, tokenized as /generate tokenizes a prompt.")
    messages: list[ChatMessage] | None = Field(None, min_length=1, description=(
        "A conversation, rendered as /v1/chat/completions renders it (with the assistant's turn opened)."))

    @model_validator(mode="after")
    def _exactly_one(self):
        if (self.text is None) == (self.messages is None):
            raise ValidationError("give exactly one of 'text' or 'messages'", field="text")
        return self


class Tokenized(BaseModel):
    """The token ids of the text, the vocabulary entry of each, and their count."""

    ids: list[int]
    tokens: list[str] = Field(description="Vocabulary entries (byte-level: `Ġ` stands for a space).")
    count: int
    text: str = Field(description="The text that was tokenized: for `messages`, the chat-templated prompt.")


class DetokenizeBody(BaseModel):
    """Token ids to turn back into text."""

    model_config = STRICT

    ids: list[TokenId] = Field(description="Token ids, each in [0, vocabulary size).")
    skip_special_tokens: bool = Field(False, description="Leave out special tokens such as <|im_start|>.")


class Detokenized(BaseModel):
    """The text of the ids."""

    text: str
