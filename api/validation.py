"""Request bodies: JSON parsed strictly, checked against their pydantic model, prompts tokenized.

Every problem is a 400 `ValidationError` naming the field. Cheap checks run first, so a malformed
request never loads the tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from flask import request
from pydantic import BaseModel
from pydantic import ValidationError as PydanticValidationError

from api.schemas import GenerationBody
from shared.exceptions import ContextLengthError, ValidationError
from shared.sampling import MAX_TOKENS_LIMIT_KEY, SamplingParams
from shared.schema_errors import validation_error
from shared.settings import Settings
from shared.tokenizer import TextTokenizer

Model = TypeVar("Model", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """A validated generation request: the prompt, its token ids, sampling and the backend mode asked for."""

    prompt: str
    prompt_ids: list[int]
    sampling: SamplingParams
    backend: str


def read_json_object(raw: bytes) -> dict:
    """The request body as a JSON object; malformed JSON, NaN/Infinity and non-objects are refused."""
    try:
        body = json.loads(raw or b"", parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValidationError(f"body is not valid JSON: {exc}", field="body") from exc
    if not isinstance(body, dict):
        raise ValidationError(f"body must be a JSON object, got {type(body).__name__}", field="body")
    return body


def parse_model(model: type[Model], body: dict, settings: Settings) -> Model:
    """`body` validated against `model`, max_tokens capped by the settings; a ValidationError naming the field."""
    try:
        return model.model_validate(body, context={MAX_TOKENS_LIMIT_KEY: settings.max_new_tokens_limit})
    except PydanticValidationError as exc:
        raise validation_error(exc.errors(), list(model.model_fields)) from None


def parse_request_body(model: type[Model], settings: Settings) -> Model:
    """The current request's JSON body validated against `model`."""
    return parse_model(model, read_json_object(request.get_data()), settings)


def parse_generation_request(body: dict, settings: Settings,
                             tokenizer: Callable[[], TextTokenizer]) -> GenerationRequest:
    """Validate a generation body; `tokenizer` is called only once the cheap checks have passed."""
    fields = parse_model(GenerationBody, body, settings)
    sampling = SamplingParams.from_fields(fields, default_max_tokens=settings.default_max_tokens)
    loaded = tokenizer()
    prompt_ids = loaded.encode(fields.prompt)
    check_prompt(prompt_ids, sampling.max_tokens, loaded, settings)
    return GenerationRequest(fields.prompt, prompt_ids, sampling, fields.backend or settings.backend_mode)


def check_prompt(prompt_ids: list[int], max_tokens: int, tokenizer: TextTokenizer, settings: Settings,
                 field: str = "prompt") -> None:
    """Refuse a prompt of no tokens, or one that with the tokens asked for does not fit the context."""
    if not prompt_ids:
        raise ValidationError(f"'{field}' encodes to no tokens", field=field)
    check_context(len(prompt_ids), max_tokens, min(tokenizer.context_length, settings.max_seq_len), field)


def check_context(prompt_tokens: int, max_tokens: int, context: int, field: str = "prompt") -> None:
    """Refuse a prompt that, with the tokens asked for, does not fit the context."""
    if prompt_tokens + max_tokens > context:
        raise ContextLengthError(
            f"the prompt has {prompt_tokens} tokens and max_tokens is {max_tokens}: together they exceed "
            f"the context of {context} tokens", field=field)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not allowed")
