"""The conversation routes: `POST /chat` (the assistant's next turn, streamed like /stream),
`POST /stream_chat_beam` (beam search, rerank, stream the winner) and `POST /rerank_scores` (debug).

Each renders the conversation with the model's chat template and fits it to the context (`api.prompts`).
BEAM and SCORE jobs run in the worker's running batch, a row per beam or candidate: a BEAM job publishes a
`candidates` event, then the winner's `token` events, then `done`; a SCORE job publishes only `done`.
"""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from api.extensions import get_settings, get_tokenizer
from api.jobs import pipeline
from api.models.conversation import BeamBody, ChatBody, RerankBody
from api.models.parsing import parse_request_body
from api.openapi import Reply, json_reply, operation, sse_media
from api.prompts import DROPPED_HEADER_DOC, fit_conversation
from api.routes.documentation import (
    BLOCKING_ERRORS,
    GENERATION_ERRORS,
    STREAM_DESCRIPTION,
    STREAM_EXAMPLE,
    X_JOB_ID,
)
from shared.exceptions import ValidationError
from shared.protocol import EVENTS_BY_KIND, BeamOptions, JobKind, ScoreDoneEvent, ScoreOptions
from shared.sampling import SamplingParams
from shared.tokenizer import TextTokenizer

bp = Blueprint("chat", __name__)


@bp.post("/chat")
@operation("Reply to a conversation, streamed token by token (SSE)", tag="chat", body=ChatBody,
           responses={200: Reply("The reply's events as they happen (the same events as /stream).", (
               sse_media(EVENTS_BY_KIND[JobKind.GENERATE], STREAM_DESCRIPTION, STREAM_EXAMPLE),),
               {**X_JOB_ID, **DROPPED_HEADER_DOC})},
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
    sampling = body.sampling(settings.default_max_tokens)
    fitted = fit_conversation(body.turns(), sampling.max_tokens, get_tokenizer(), settings)
    job = pipeline.enqueue(fitted.prompt_ids, sampling, body)
    return fitted.mark(pipeline.stream(job))



BEAM_EXAMPLE = ('id: 1\nevent: candidates\ndata: {"candidates":[{"index":0,"text":"Paris.","beam_score":-0.21,'
                '"rerank_score":0.62,"combined_score":0.71}],"winner":0,"use_rerank":true}\n\n'
                'id: 2\nevent: token\ndata: {"token":4562,"text":"Paris","index":0}\n\n'
                'id: 3\nevent: done\ndata: {"job_id":"0f3c...","output_text":"Paris","output_ids":[4562],'
                '"finish_reason":"length","winner":0,"usage":{"prompt_tokens":31,"completion_tokens":1}}\n\n')

BEAM_DESCRIPTION = ("Server-sent events: one `candidates` event once the search has ended, then the winner's "
                    "`token` events, then `done` (or an `error` event at any point).")



@bp.post("/stream_chat_beam")
@operation("Beam search over a conversation, rerank, stream the winner (SSE)", tag="chat", body=BeamBody,
           responses={200: Reply("The candidates, then the winner's tokens.", (
               sse_media(EVENTS_BY_KIND[JobKind.BEAM], BEAM_DESCRIPTION, BEAM_EXAMPLE),),
               {**X_JOB_ID, **DROPPED_HEADER_DOC})},
           errors=GENERATION_ERRORS)
def stream_chat_beam() -> Response:
    """Run a beam search for the assistant's next turn; every beam is a candidate, the winner is streamed.

    With `use_rerank` the reranker picks the winner (the best combined score), otherwise the best beam.
    The tokens are sent once the search has ended. Leaving the stream cancels the job. The history is
    fitted to the context as /chat fits it.
    """
    settings = get_settings()
    body = parse_request_body(BeamBody, settings)
    max_tokens = body.max_tokens or settings.default_max_tokens
    fitted = fit_conversation(body.turns(), max_tokens, get_tokenizer(), settings)
    beam = BeamOptions(beam_width=body.beam_width, length_penalty=body.length_penalty, use_rerank=body.use_rerank,
                       context=fitted.context)
    job = pipeline.enqueue(fitted.prompt_ids, SamplingParams(max_tokens=max_tokens),
                           body, kind=JobKind.BEAM, beam=beam)
    return fitted.mark(pipeline.stream(job))


@bp.post("/rerank_scores")
@operation("Score given answers to a conversation (debug)", tag="chat", body=RerankBody,
           responses={200: json_reply("Every candidate's scores, and the winner.", ScoreDoneEvent,
                                      headers={**X_JOB_ID, **DROPPED_HEADER_DOC})},
           errors=BLOCKING_ERRORS)
def rerank_scores():
    """Score each candidate as the assistant's next turn: its LM score, its relevance, and the two combined.

    Nothing is generated. These are the scores /stream_chat_beam's reranker would give the same texts as
    beams; the winner is the one it would stream.
    """
    settings = get_settings()
    body = parse_request_body(RerankBody, settings)
    tokenizer = get_tokenizer()
    longest = max(candidate_lengths(body.candidates, tokenizer))
    fitted = fit_conversation(body.turns(), longest, tokenizer, settings, "the longest candidate's token count")
    score = ScoreOptions(candidates=body.candidates, context=fitted.context, length_penalty=body.length_penalty)
    job = pipeline.enqueue(fitted.prompt_ids, SamplingParams(max_tokens=longest),
                           body, kind=JobKind.SCORE, score=score)
    response = fitted.mark(jsonify(pipeline.collect(job).model_dump(mode="json")))
    response.headers["X-Job-Id"] = job.job_id
    return response


def candidate_lengths(candidates: list[str], tokenizer: TextTokenizer) -> list[int]:
    """Tokens of each candidate, counted as the worker tokenizes them (no special tokens)."""
    lengths = []
    for index, text in enumerate(candidates):
        ids = tokenizer.backend.encode(text, add_special_tokens=False).ids
        if not ids:
            raise ValidationError(f"'candidates[{index}]' encodes to no tokens", field="candidates")
        lengths.append(len(ids))
    return lengths
