"""OpenAI-compatible routes under /v1: the same pipeline as /generate and /stream, OpenAI's shapes.

A request is validated (`api.openai.models`), tokenized (chat messages through the model's chat
template), checked against the context, enqueued on a live pool and then either collected into one
answer or relayed as chunks; a client leaving a stream cancels the job, as on /stream.
"""

from __future__ import annotations

import time

from flask import Blueprint, jsonify

from api import errors
from api.extensions import get_settings, get_tokenizer
from api.jobs import pipeline
from api.models.parsing import parse_request_body
from api.openai.format import ChatCompletionView, ChunkEncoder, TextCompletionView, openai_error
from api.openai.models import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ModelCard,
    ModelList,
    OpenAIErrorBody,
    OpenAIRequest,
)
from api.openapi import Media, Reply, json_reply, operation, sse_media
from api.prompts import check_prompt
from api.routes.documentation import BLOCKING_ERRORS, X_JOB_ID
from shared.exceptions import ModelNotFoundError
from shared.model_files import MANIFEST, model_name

bp = Blueprint("openai", __name__, url_prefix="/v1")

PREFIX = "/v1/"
OWNER = "llm-stream-server"

JOB_ERRORS = {**BLOCKING_ERRORS, 404: "The `model` asked for is not served here (code `model_not_found`)."}
"""Errors of the generation routes, in OpenAI's shape (`code` is the native error type)."""

STREAM_DESCRIPTION = ("With `stream: true`: server-sent `data:` chunks (see `x-events`), then `data: [DONE]`. "
                      "A failure mid-way is an `error` chunk, then [DONE].")


def init_app(app) -> None:
    """Register the blueprint, and OpenAI's error shape for every error under /v1/."""
    app.register_blueprint(bp)
    errors.register_format(app, PREFIX, openai_error)


def served_model() -> ModelCard:
    """The one model this server runs."""
    folder = get_settings().model_path
    manifest = folder / MANIFEST
    created = int(manifest.stat().st_mtime) if manifest.is_file() else 0
    return ModelCard(id=model_name(folder), created=created, owned_by=OWNER)


@bp.get("/models")
@operation("The served model", tag="openai", error_model=OpenAIErrorBody,
           responses={200: json_reply("A list of one model.", ModelList)})
def models():
    """The model every /v1 request runs on (its id is what `model` may say)."""
    return jsonify(ModelList(data=[served_model()]).model_dump())


def _reply(answer, chunk) -> Reply:
    """A 200 that is JSON, or SSE chunks when the body says `stream: true`."""
    sse = sse_media({"chunk": chunk, "error": OpenAIErrorBody}, STREAM_DESCRIPTION,
                    'data: {"id":"...","object":"...","choices":[...]}\n\ndata: [DONE]\n\n',
                    named_events=False, end_marker="[DONE]")
    return Reply("The answer (`stream: false`) or its chunks (`stream: true`).",
                 (Media("application/json", answer), sse), X_JOB_ID)


@bp.post("/completions")
@operation("Complete a prompt (OpenAI-compatible)", tag="openai", body=CompletionRequest,
           error_model=OpenAIErrorBody, errors=JOB_ERRORS, responses={200: _reply(Completion, Completion)})
def completions():
    """Continue `prompt`, as OpenAI's legacy completions endpoint does."""
    body = parse_request_body(CompletionRequest, get_settings())
    model = check_model(body)
    return run(body, model, get_tokenizer().encode(body.prompt), TextCompletionView, "prompt")


@bp.post("/chat/completions")
@operation("Reply to a conversation (OpenAI-compatible)", tag="openai", body=ChatCompletionRequest,
           error_model=OpenAIErrorBody, errors=JOB_ERRORS, responses={200: _reply(ChatCompletion, ChatCompletionChunk)})
def chat_completions():
    """Render `messages` with the model's chat template and generate the assistant's reply."""
    body = parse_request_body(ChatCompletionRequest, get_settings())
    model = check_model(body)
    prompt_ids = get_tokenizer().encode_chat([message.as_template_input() for message in body.messages])
    return run(body, model, prompt_ids, ChatCompletionView, "messages")


def check_model(body: OpenAIRequest) -> ModelCard:
    """The served model, if the body names it or none; a 404 `model_not_found` naming `model` otherwise."""
    model = served_model()
    if body.model is not None and body.model != model.id:
        raise ModelNotFoundError(f"the model {body.model!r} is not served here; GET /v1/models lists {model.id!r}",
                                 field="model")
    return model


def run(body: OpenAIRequest, model: ModelCard, prompt_ids: list[int], view_class, prompt_field: str):
    """Check the context, enqueue, then stream chunks or answer once the job is done."""
    settings = get_settings()
    sampling = body.sampling(settings.default_max_tokens)
    check_prompt(prompt_ids, sampling.max_tokens, get_tokenizer(), settings, field=prompt_field)
    job = pipeline.enqueue(prompt_ids, sampling, body)
    view = view_class(job.job_id, model.id, int(time.time()))
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return pipeline.stream(job, ChunkEncoder(view, include_usage))
    response = jsonify(view.whole(pipeline.collect(job)))
    response.headers["X-Job-Id"] = job.job_id
    return response
