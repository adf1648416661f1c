"""`POST /tokenize` and `POST /detokenize`: the model's tokenizer over HTTP (no job, no worker)."""

from __future__ import annotations

from flask import Blueprint, jsonify

from api.extensions import get_settings, get_tokenizer
from api.models.parsing import parse_request_body
from api.models.tokenizer import DetokenizeBody, Detokenized, TokenizeBody, Tokenized
from api.openapi import json_reply, operation
from shared.exceptions import ValidationError

bp = Blueprint("tokenizer", __name__)

ERRORS = {400: "A field is missing or of the wrong type, or an id is outside the vocabulary (`field` names it).",
          413: "The body is larger than 1 MiB."}


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
    size = tokenizer.vocabulary_size
    for position, token in enumerate(body.ids):
        if not 0 <= token < size:
            raise ValidationError(f"'ids[{position}]' is {token}, outside the vocabulary [0, {size})", field="ids")
    text = tokenizer.decode(body.ids, skip_special_tokens=body.skip_special_tokens)
    return jsonify(Detokenized(text=text).model_dump())
