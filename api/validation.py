"""Request bodies of /generate and /stream: parsed, checked field by field, the prompt tokenized.

Every problem is a 400 `ValidationError` naming the field. Cheap checks run first, so a malformed
request never loads the tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from shared.exceptions import ContextLengthError, ValidationError
from shared.sampling import SamplingParams
from shared.settings import BACKEND_MODES, Settings
from shared.tokenizer import TextTokenizer

SAMPLING_FIELDS = frozenset({"max_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed", "stop"})
"""Body fields handed to `SamplingParams.from_dict`."""

REQUEST_FIELDS = SAMPLING_FIELDS | {"prompt", "backend"}
"""Every field a generation request may carry; anything else is refused."""


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


def parse_generation_request(body: dict, settings: Settings,
                             tokenizer: Callable[[], TextTokenizer]) -> GenerationRequest:
    """Validate a generation body; `tokenizer` is called only once the cheap checks have passed."""
    unknown = sorted(set(body) - REQUEST_FIELDS)
    if unknown:
        listed = ", ".join(repr(name) for name in unknown)
        raise ValidationError(f"unknown field(s) {listed}; allowed: {', '.join(sorted(REQUEST_FIELDS))}",
                              field=unknown[0])
    prompt = _prompt(body.get("prompt"))
    sampling_fields = {name: body[name] for name in SAMPLING_FIELDS if body.get(name) is not None}
    sampling_fields.setdefault("max_tokens", settings.default_max_tokens)
    sampling = SamplingParams.from_dict(sampling_fields, max_tokens_limit=settings.max_new_tokens_limit)
    backend = _backend(body.get("backend"), settings.backend_mode)
    loaded = tokenizer()
    prompt_ids = loaded.encode(prompt)
    if not prompt_ids:
        raise ValidationError("'prompt' encodes to no tokens", field="prompt")
    check_context(len(prompt_ids), sampling.max_tokens, min(loaded.context_length, settings.max_seq_len))
    return GenerationRequest(prompt, prompt_ids, sampling, backend)


def check_context(prompt_tokens: int, max_tokens: int, context: int) -> None:
    """Refuse a prompt that, with the tokens asked for, does not fit the context."""
    if prompt_tokens + max_tokens > context:
        raise ContextLengthError(
            f"the prompt has {prompt_tokens} tokens and max_tokens is {max_tokens}: together they exceed "
            f"the context of {context} tokens", field="prompt")


def _prompt(value) -> str:
    if value is None:
        raise ValidationError("'prompt' is required", field="prompt")
    if not isinstance(value, str):
        raise ValidationError("'prompt' must be a string", field="prompt")
    if value == "":
        raise ValidationError("'prompt' must not be empty", field="prompt")
    return value


def _backend(value, default: str) -> str:
    if value is None:
        return default
    if not isinstance(value, str) or value not in BACKEND_MODES:
        raise ValidationError(f"'backend' must be one of {', '.join(BACKEND_MODES)}, got {value!r}",
                              field="backend")
    return value


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not allowed")
