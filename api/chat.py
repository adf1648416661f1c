"""`POST /chat`: a multi-turn conversation, rendered with the model's chat template, streamed like /stream."""

from __future__ import annotations

from flask import Blueprint, Response

from api import pipeline
from api.chat_schemas import ChatBody
from api.conversation import DROPPED_HEADER_DOC, fit_conversation
from api.extensions import get_settings, get_tokenizer
from api.generation import GENERATION_ERRORS, JOB_EVENTS, STREAM_DESCRIPTION, STREAM_EXAMPLE, X_JOB_ID
from api.openapi import Reply, operation, sse_media
from api.validation import parse_request_body
from shared.sampling import SamplingParams

bp = Blueprint("chat", __name__)


@bp.post("/chat")
@operation("Reply to a conversation, streamed token by token (SSE)", tag="chat", body=ChatBody,
           responses={200: Reply("The reply's events as they happen (the same events as /stream).", (
               sse_media(JOB_EVENTS, STREAM_DESCRIPTION, STREAM_EXAMPLE),), {**X_JOB_ID, **DROPPED_HEADER_DOC})},
           errors=GENERATION_ERRORS)
def chat() -> Response:
    """Render the conversation with the model's chat template and stream the assistant's next turn.

    Events, headers and cancel-on-leave are those of /stream. A history too long for the context loses its
    oldest user/assistant pairs, never the system message or the last user turn; the `X-Messages-Dropped`
    header says how many messages went (a 400 `context_length_exceeded` when even those do not fit). A
    conversation ending with an assistant turn gets another assistant turn.
    """
    settings = get_settings()
    body = parse_request_body(ChatBody, settings)
    sampling = SamplingParams.from_fields(body, default_max_tokens=settings.default_max_tokens)
    fitted = fit_conversation(body.turns(), sampling.max_tokens, get_tokenizer(), settings)
    job = pipeline.enqueue(fitted.prompt_ids, sampling, body.backend or settings.backend_mode)
    return fitted.mark(pipeline.stream(job))
