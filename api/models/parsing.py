"""Request bodies as models: JSON parsed strictly, validated against a pydantic model, and pydantic's errors
turned into the service's one `ValidationError` (a 400 with a sentence naming the field).

A request that breaks several rules gets the first one (unknown fields before everything else, as a
client that misspelt a name learns most from that). Union types (`stop`: a string or a list) report one
error per alternative; the most specific one is kept, or all alternatives are named when none matched.
"""

from __future__ import annotations

import json
from typing import TypeVar

from flask import request
from pydantic import BaseModel
from pydantic import ValidationError as PydanticValidationError

from api.models.fields import MAX_TOKENS_LIMIT_KEY
from shared.exceptions import ValidationError
from shared.settings import Settings

Model = TypeVar("Model", bound=BaseModel)


def read_json_object(raw: bytes) -> dict:
    """The request body as a JSON object; malformed JSON, NaN/Infinity and non-objects are refused."""
    try:
        body = json.loads(raw or b"", parse_constant=_refuse_constant, parse_float=_number)
    except RecursionError:
        raise ValidationError("body nests arrays or objects too deeply", field="body") from None
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


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not allowed")


def _number(text: str) -> float | int:
    """A JSON number written with a fraction or an exponent. One with no fractional part is an integer (`10.0`
    is 10), as JSON Schema's `integer` (the document's) has it; strict models then take it for an int field."""
    value = float(text)
    return int(value) if value.is_integer() else value


TYPE_NAMES = {
    "string_type": "a string", "int_type": "an integer", "float_type": "a number", "bool_type": "a boolean",
    "list_type": "a list", "dict_type": "an object", "model_type": "an object", "model_attributes_type": "an object",
    "int_from_float": "an integer", "none_required": "null",
}
"""Pydantic type-error codes -> what the field must be, in words."""


def validation_error(errors: list[dict], allowed: list[str] | None = None) -> ValidationError:
    """One ValidationError for pydantic's `errors()` list; `allowed` names the fields a body may carry."""
    unknown = [error for error in errors if error["type"] == "extra_forbidden"]
    if unknown:
        unknown.sort(key=lambda error: _path(error["loc"]))
        names = [_path(error["loc"]) for error in unknown]
        listed = ", ".join(repr(name) for name in names)
        top_level = all(len(error["loc"]) == 1 for error in unknown)
        hint = f"; allowed: {', '.join(sorted(allowed))}" if allowed and top_level else ""
        return ValidationError(f"unknown or unsupported field(s) {listed}{hint}", field=_top(unknown[0]["loc"]))
    top = _top(errors[0]["loc"])
    group = [error for error in errors if _top(error["loc"]) == top]
    specific = [error for error in group if not _is_union_mismatch(error)]
    if not specific and len(group) > 1:
        kinds = " or ".join(dict.fromkeys(TYPE_NAMES.get(error["type"], error["type"]) for error in group))
        return ValidationError(f"'{top}' must be {kinds}, got {_show(group[0].get('input'))}", field=top)
    best = max(specific or group, key=lambda error: len(error["loc"]))
    return ValidationError(_sentence(best), field=top)


def _sentence(error: dict) -> str:
    """`'max_tokens' must be an integer, got '10'`-style text for one pydantic error."""
    path, kind, message = _path(error["loc"]), error["type"], error["msg"]
    if kind == "missing":
        return f"'{path}' is required"
    if kind in TYPE_NAMES:
        return f"'{path}' must be {TYPE_NAMES[kind]}, got {_show(error.get('input'))}"
    if kind in ("string_too_short", "too_short") and (error.get("ctx") or {}).get("min_length") == 1:
        return f"'{path}' must not be empty"
    if kind in ("too_short", "too_long"):
        return f"'{path}': {message[0].lower()}{message[1:]}"
    if kind in ("value_error", "assertion_error"):
        return f"'{path}' {message.split(', ', 1)[-1]}"
    return f"'{path}': {message[0].lower()}{message[1:]}, got {_show(error.get('input'))}"


def _is_union_mismatch(error: dict) -> bool:
    """A type error of one alternative of a union (`('stop', 'str')`): says less than a deeper error."""
    return error["type"] in TYPE_NAMES and len(error["loc"]) == 2 and _is_tag(error["loc"][1])


def _top(loc: tuple) -> str:
    """The body field an error belongs to (`body` for the body as a whole)."""
    return str(loc[0]) if loc else "body"


def _path(loc: tuple) -> str:
    """`('messages', 0, 'role')` -> `messages[0].role`, leaving out pydantic's union tags."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif not _is_tag(part):
            text += f".{part}" if text else str(part)
    return text or "body"


def _is_tag(part) -> bool:
    """Whether a loc part names a union alternative (`str`, `list[str]`, `function-after[...]`), not a field."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "list", "dict", "none")
                                      or not part.isidentifier())


def _show(value) -> str:
    """A short rendering of the offending value for the message."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
