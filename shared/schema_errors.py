"""Pydantic's validation errors as the service's one `ValidationError`: a sentence naming the field.

A request that breaks several rules gets the first one (unknown fields before everything else, as a
client that misspelt a name learns most from that). Union types (`stop`: a string or a list) report one
error per alternative; the most specific one is kept, or all alternatives are named when none matched.
"""

from __future__ import annotations

from shared.exceptions import ValidationError

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
