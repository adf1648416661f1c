"""The OpenAPI 3.1 document, made from the routes themselves, and Swagger UI to read it.

Each view carries its `Operation` (the `@operation(...)` decorator); `build_document` walks the app's URL
map and turns those into paths, and the pydantic models they name into `components/schemas` with
`models_json_schema`. The models are the ones that validate the requests, so the document cannot drift.
Swagger UI's files come from an installed package (no CDN: deployments may have no internet).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from importlib import metadata, resources
from pathlib import Path

from flask import Blueprint, Flask, current_app, jsonify, send_from_directory
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from api.extensions import get_settings, get_tokenizer
from api.models.fields import SERVER_LIMITS_KEY
from shared.exceptions import ConfigurationError
from shared.protocol import ErrorBody

OPENAPI_VERSION = "3.1.0"
SKIPPED_METHODS = frozenset({"HEAD", "OPTIONS"})
"""Methods Flask adds to every rule by itself."""

TAGS = [
    {"name": "generation", "description": "Native generation routes: one JSON answer, or SSE token by token."},
    {"name": "chat", "description": "Conversations: a streamed reply, beam search with a reranker, and its scores."},
    {"name": "batches", "description": "Many prompts at once, one job each; results waited for or polled."},
    {"name": "jobs", "description": "A job after it started: status, resuming its stream, cancelling."},
    {"name": "openai", "description": "OpenAI-compatible routes (the official clients work against /v1)."},
    {"name": "tokenizer", "description": "The model's tokenizer and chat template."},
    {"name": "service", "description": "Health of the service."},
    {"name": "docs", "description": "This document, Swagger UI and the demo page."},
]
"""Groups of operations, in the order a reader meets them."""

SECURITY_SCHEMES = {"apiKey": {
    "type": "http", "scheme": "bearer",
    "description": "With API_KEYS set, every route but the open ones (OPEN_ROUTES) wants `Authorization: Bearer <key>` "
                   "and answers 401 without a valid one; jobs and batches are visible only to the key that made them."}}
"""Swagger UI's Authorize button sends the key given there."""

DOCUMENT_KEY = "openapi_document"
"""Where the built document is cached in `app.extensions` (routes do not change after start-up)."""


@dataclass(frozen=True)
class Media:
    """One content type of a response: a JSON model, SSE events, or a plain schema."""

    media_type: str
    model: type[BaseModel] | None = None
    schema: dict | None = None
    events: dict[str, type[BaseModel] | tuple[type[BaseModel], ...]] = field(default_factory=dict)
    example: str | None = None
    named_events: bool = True
    """SSE: whether each frame's `event:` line is its `events` key (OpenAI's chunks have none: `message`)."""
    end_marker: str | None = None
    """SSE: a last `data:` line that is not JSON (OpenAI's `[DONE]`)."""


@dataclass(frozen=True)
class Reply:
    """One documented response status: its description, its content types, its headers."""

    description: str
    content: tuple[Media, ...] = ()
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Param:
    """A query or header parameter (path parameters are read from the rule)."""

    name: str
    location: str
    description: str
    schema: dict = field(default_factory=lambda: {"type": "string"})


@dataclass(frozen=True)
class Operation:
    """What the document says about one view."""

    summary: str
    description: str
    tag: str
    body: type[BaseModel] | None
    responses: dict[int, Reply]
    errors: dict[int, str]
    error_model: type[BaseModel]
    params: tuple[Param, ...]


def operation(summary: str, *, tag: str, responses: dict[int, Reply], body: type[BaseModel] | None = None,
              errors: dict[int, str] | None = None, error_model: type[BaseModel] = ErrorBody,
              params: tuple[Param, ...] = ()):
    """Decorator: attach the view's `Operation`; its docstring becomes the description."""
    def mark(view):
        view.openapi = Operation(summary, (view.__doc__ or "").strip(), tag, body, responses, errors or {},
                                 error_model, params)
        return view
    return mark


def json_reply(description: str, model: type[BaseModel] | None = None, *, schema: dict | None = None,
               headers: dict[str, str] | None = None) -> Reply:
    """A JSON response of `model` (or a raw `schema`)."""
    return Reply(description, (Media("application/json", model, schema),), headers or {})


def sse_media(events: dict[str, type[BaseModel]], description: str, example: str, *, named_events: bool = True,
              end_marker: str | None = None) -> Media:
    """A `text/event-stream` body. Its `schema` describes one event, as OpenAPI 3.2's `itemSchema` does (3.1
    has no keyword for it, and fuzzers such as schemathesis read `schema` so): an object of the frame's
    `event`, `id` and `data` lines, `data` being JSON of the event's model (`contentSchema`). `x-events`
    maps each event name to the schema of its `data:` JSON. Without `named_events` the frames carry no
    `event:` line (OpenAI's chunks) and the keys of `events` only name the alternatives."""
    return Media("text/event-stream", schema={"description": description}, events=events, example=example,
                 named_events=named_events, end_marker=end_marker)


def build_document(app: Flask) -> dict:
    """The OpenAPI document of every documented route of `app`."""
    found = [(rule, app.view_functions[rule.endpoint].openapi) for rule in app.url_map.iter_rules()
             if hasattr(app.view_functions[rule.endpoint], "openapi")]
    refs, definitions = _schemas(operation for _, operation in found)
    write_server_limits(definitions, server_limit_values())
    paths: dict[str, dict] = {}
    for rule, op in sorted(found, key=lambda item: item[0].rule):
        for method in sorted(rule.methods - SKIPPED_METHODS):
            paths.setdefault(_path(rule.rule), {})[method.lower()] = _operation(rule, method, op, refs)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "LLM stream server", "version": _version(),
                 "description": "Streaming text generation: native routes, OpenAI-compatible routes under /v1, "
                                "tokenizer routes. Native errors are `{\"error\": {\"type\", \"message\", "
                                "\"field\"}}`; errors under /v1 take OpenAI's shape. What the HTTP server "
                                "refuses before reading the path is native on every path: 414 for a request "
                                "line over 4094 bytes, 431 for over 100 headers or one over 8190 bytes, 400 for "
                                "a malformed request. A `text/event-stream` schema describes one event (as "
                                "OpenAPI 3.2's `itemSchema` does); `x-events` maps event names to their data."},
        "tags": TAGS,
        "paths": paths,
        "components": {"schemas": definitions.get("$defs", {}), "securitySchemes": SECURITY_SCHEMES},
        "security": [{}, {"apiKey": []}],  # a key where the server asks for one (API_KEYS): README, "Security"
    }


def _schemas(operations) -> tuple[dict, dict]:
    """JSON Schemas of every model the operations name, as `$ref`s into components/schemas."""
    wanted: dict = {}
    for op in operations:
        if op.body is not None:
            wanted[(op.body, "validation")] = None
        wanted[(op.error_model, "serialization")] = None
        for reply in op.responses.values():
            for media in reply.content:
                for model in ([media.model] if media.model else []) + _event_models(media):
                    wanted[(model, "serialization")] = None
    refs, definitions = models_json_schema(list(wanted), ref_template="#/components/schemas/{model}")
    return refs, definitions


def server_limit_values() -> dict:
    """The values an `x-server-limits` marker may name: every setting, and the tokenizer's vocabulary size
    (left out, with the bound it gives, when the model folder cannot be read)."""
    settings = get_settings()
    limits = {field.name: getattr(settings, field.name) for field in fields(settings)}
    try:
        limits["vocabulary_size"] = get_tokenizer().vocabulary_size
    except ConfigurationError:
        pass
    return limits


def write_server_limits(schema, limits: dict) -> None:
    """Replace each `x-server-limits` marker (api/models/fields.py) by the keywords it names, with this server's
    values (`"maximum": 4096` for `{"maximum": "max_new_tokens_limit"}`), so the document states them."""
    if isinstance(schema, dict):
        for keyword, name in schema.pop(SERVER_LIMITS_KEY, {}).items():
            if name in limits:
                schema[keyword] = limits[name]
        children = schema.values()
    elif isinstance(schema, list):
        children = schema
    else:
        return
    for child in children:
        write_server_limits(child, limits)


def _operation(rule, method: str, op: Operation, refs: dict) -> dict:
    """One OpenAPI operation object."""
    params = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
              for name in sorted(rule.arguments)]
    params += [{"name": p.name, "in": p.location, "description": p.description, "schema": p.schema}
               for p in op.params]
    operation_id = f"{method.lower()}_{rule.endpoint.replace('.', '_')}"
    result: dict = {"tags": [op.tag], "summary": op.summary, "operationId": operation_id}
    if op.description:
        result["description"] = op.description
    if params:
        result["parameters"] = params
    if op.body is not None:
        result["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": refs[(op.body, "validation")]}}}
    responses = {str(status): _reply(reply, refs) for status, reply in op.responses.items()}
    for status, description in op.errors.items():
        responses[str(status)] = {"description": description, "content": {
            "application/json": {"schema": refs[(op.error_model, "serialization")]}}}
    result["responses"] = responses
    return result


def _reply(reply: Reply, refs: dict) -> dict:
    """One OpenAPI response object."""
    result: dict = {"description": reply.description}
    if reply.headers:
        result["headers"] = {name: {"description": text, "schema": {"type": "string"}}
                             for name, text in reply.headers.items()}
    content = {}
    for media in reply.content:
        entry: dict = {"schema": refs[(media.model, "serialization")] if media.model else media.schema or {}}
        if media.events:
            entry["schema"] = {**(media.schema or {}), **_event_schema(media, refs)}
            entry["x-events"] = {name: _one_of(_as_tuple(models), refs) for name, models in media.events.items()}
        if media.example is not None:
            entry["example"] = media.example
        content[media.media_type] = entry
    if content:
        result["content"] = content
    return result


def _event_schema(media: Media, refs: dict) -> dict:
    """The JSON Schema of one server-sent event of `media`, read as `{"event", "id", "data"}` (the SSE
    defaults: `event` is `message` when the frame has no `event:` line)."""
    def frame(event: dict, data: dict) -> dict:
        return {"type": "object", "required": ["event", "data"],
                "properties": {"event": event, "id": {"type": "string"}, "data": data}}

    def json_data(models) -> dict:
        return {"type": "string", "contentMediaType": "application/json",
                "contentSchema": _one_of(_as_tuple(models), refs)}

    if media.named_events:
        return {"oneOf": [frame({"const": name}, json_data(models)) for name, models in media.events.items()]}
    data = json_data(tuple(model for models in media.events.values() for model in _as_tuple(models)))
    if media.end_marker is not None:
        data = {"anyOf": [data, {"const": media.end_marker}]}
    return frame({"const": "message"}, data)


def _as_tuple(models) -> tuple[type[BaseModel], ...]:
    """An event's model, or its several alternatives, as a tuple."""
    return models if isinstance(models, tuple) else (models,)


def _event_models(media: Media) -> list[type[BaseModel]]:
    """Every model an SSE media type's events may carry."""
    return [model for models in media.events.values() for model in _as_tuple(models)]


def _one_of(models: tuple[type[BaseModel], ...], refs: dict) -> dict:
    """The `$ref` of one model, or `anyOf` the refs of several."""
    schemas = [refs[(model, "serialization")] for model in models]
    return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}


def _path(rule: str) -> str:
    """Flask's `/jobs/<job_id>` (or `<string:job_id>`) as OpenAPI's `/jobs/{job_id}`."""
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule)


def _version() -> str:
    try:
        return metadata.version("llm-stream-server")
    except metadata.PackageNotFoundError:
        return "0.1.0"


# --- routes -------------------------------------------------------------------------------------------

bp = Blueprint("openapi", __name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
"""The package's own page files (the demo page and the docs page)."""

SWAGGER_UI = resources.files("flask_openapi3_swagger") / "templates" / "swagger"
"""Swagger UI 5 (the first to read OpenAPI 3.1), as shipped by the flask-openapi3-swagger package."""


@bp.get("/openapi.json")
@operation("This document", tag="docs", responses={200: json_reply(
    "The OpenAPI 3.1 document.", schema={"type": "object"})})
def document():
    """The OpenAPI document describing every route, request body and response."""
    extensions = current_app.extensions
    if DOCUMENT_KEY not in extensions:
        extensions[DOCUMENT_KEY] = build_document(current_app)
    return jsonify(extensions[DOCUMENT_KEY])


@bp.get("/docs")
@operation("Swagger UI", tag="docs", responses={200: Reply("An HTML page reading /openapi.json.", (
    Media("text/html", schema={"type": "string"}),))})
def docs():
    """Swagger UI for /openapi.json, served from installed files."""
    return send_from_directory(STATIC_DIR, "docs.html", max_age=0)


@bp.get("/docs/assets/<path:filename>")
def swagger_asset(filename: str):
    """Swagger UI's scripts, styles and images (not in the document: they are the viewer, not the API)."""
    return send_from_directory(str(SWAGGER_UI), filename, max_age=3600)
