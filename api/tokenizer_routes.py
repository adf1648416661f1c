"""`POST /tokenize` and `POST /detokenize`: the model's tokenizer over HTTP (no job, no worker)."""

from __future__ import annotations

from flask import Blueprint, jsonify
from pydantic import BaseModel, Field, model_validator

from api.extensions import get_settings, get_tokenizer
from api.openapi import json_reply, operation
from api.schemas import ChatMessage
from api.validation import parse_request_body
from shared.exceptions import ValidationError
from shared.sampling import STRICT

bp = Blueprint("tokenizer", __name__)

ERRORS = {400: "A field is missing or of the wrong type, or an id is outside the vocabulary (`field` names it).",
          413: "The body is larger than 1 MiB."}


class TokenizeBody(BaseModel):
    """Text to tokenize as is, or messages to render with the chat template first (exactly one of the two)."""

    model_config = STRICT

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

    ids: list[int] = Field(description="Token ids, each in [0, vocabulary size).")
    skip_special_tokens: bool = Field(False, description="Leave out special tokens such as <|im_start|>.")


class Detokenized(BaseModel):
    """The text of the ids."""

    text: str


@bp.post("/tokenize")
@operation("Tokenize text or a chat", tag="tokenizer", body=TokenizeBody, errors=ERRORS,
           responses={200: json_reply("The tokens.", Tokenized)})
def tokenize():
    """Token ids of text, or of the prompt the chat template makes of messages."""
    body = parse_request_body(TokenizeBody, get_settings())
    tokenizer = get_tokenizer()
    if body.messages is not None:
        text = tokenizer.render_chat([message.as_template_input() for message in body.messages])
        ids = tokenizer.encode_rendered(text)  # the template rendered once
    else:
        text, ids = body.text, tokenizer.encode(body.text)
    return jsonify(Tokenized(ids=ids, tokens=tokenizer.token_strings(ids), count=len(ids), text=text).model_dump())


@bp.post("/detokenize")
@operation("Turn token ids back into text", tag="tokenizer", body=DetokenizeBody, errors=ERRORS,
           responses={200: json_reply("The text.", Detokenized)})
def detokenize():
    """The text of token ids; `detokenize(tokenize(text))` gives the text back."""
    body = parse_request_body(DetokenizeBody, get_settings())
    tokenizer = get_tokenizer()
    size = tokenizer.backend.get_vocab_size(with_added_tokens=True)
    for position, token in enumerate(body.ids):
        if not 0 <= token < size:
            raise ValidationError(f"'ids[{position}]' is {token}, outside the vocabulary [0, {size})", field="ids")
    text = tokenizer.decode(body.ids, skip_special_tokens=body.skip_special_tokens)
    return jsonify(Detokenized(text=text).model_dump())
