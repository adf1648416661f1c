"""From a validated request to prompt token ids that fit the context: a raw prompt, a batch of prompts, or a
conversation rendered with the model's chat template.

Every problem is a 400 naming the field. Cheap checks run first, so a malformed request never loads the
tokenizer. A conversation too long for the context loses its oldest user/assistant pairs, whole, so the
turns still alternate; the system message and the last user turn are always kept. How many messages went
is reported to the client (`X-Messages-Dropped`), never hidden.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from flask import Response

from api.models.generation import GenerationBody
from api.models.parsing import parse_model
from shared.exceptions import ContextLengthError, ValidationError
from shared.limits import check_context
from shared.sampling import SamplingParams
from shared.settings import Settings
from shared.tokenizer import TextTokenizer


def context_size(tokenizer: TextTokenizer, settings: Settings) -> int:
    """Tokens a prompt and its output may take together: the model's context, or MAX_SEQ_LEN if smaller."""
    return min(tokenizer.context_length, settings.max_seq_len)


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """A validated generation request: the prompt, its token ids, sampling, and the body (its placement)."""

    prompt: str
    prompt_ids: list[int]
    sampling: SamplingParams
    body: GenerationBody


def parse_generation_request(body: dict, settings: Settings,
                             tokenizer: Callable[[], TextTokenizer]) -> GenerationRequest:
    """Validate a generation body; `tokenizer` is called only once the cheap checks have passed."""
    fields = parse_model(GenerationBody, body, settings)
    sampling = fields.sampling(settings.default_max_tokens)
    loaded = tokenizer()
    prompt_ids = loaded.encode(fields.prompt)
    check_prompt(prompt_ids, sampling.max_tokens, loaded, settings)
    return GenerationRequest(fields.prompt, prompt_ids, sampling, fields)


def check_prompt(prompt_ids: list[int], max_tokens: int, tokenizer: TextTokenizer, settings: Settings,
                 field: str = "prompt") -> None:
    """Refuse a prompt of no tokens, or one that with the tokens asked for does not fit the context."""
    if not prompt_ids:
        raise ValidationError(f"'{field}' encodes to no tokens", field=field)
    check_context(len(prompt_ids), max_tokens, context_size(tokenizer, settings), field)


def encode_prompts(prompts: list[str], max_tokens: int, tokenizer: TextTokenizer,
                   settings: Settings) -> list[list[int]]:
    """Token ids of every prompt; a 400 naming `prompts[i]` for the first one that does not fit the context."""
    context = context_size(tokenizer, settings)
    encoded = []
    for index, prompt in enumerate(prompts):
        ids = tokenizer.encode(prompt)
        if not ids:
            raise ValidationError(f"'prompts[{index}]' encodes to no tokens", field="prompts")
        try:
            check_context(len(ids), max_tokens, context, field="prompts")
        except ContextLengthError as exc:
            raise ContextLengthError(f"'prompts[{index}]': {exc.message}", field="prompts") from None
        encoded.append(ids)
    return encoded


DROPPED_HEADER = "X-Messages-Dropped"
"""Response header: how many of the oldest messages were left out to fit the context."""

DROPPED_HEADER_DOC = {DROPPED_HEADER: "Messages dropped from the start of the history to fit the context (0: none)."}


@dataclass(frozen=True, slots=True)
class FittedConversation:
    """The turns that were rendered, their prompt ids, and how many messages were dropped to fit."""

    turns: list[dict]
    prompt_ids: list[int]
    dropped: int

    @property
    def context(self) -> str:
        """What the reranker compares answers with: the conversation's turns as text, newest last.

        The whole conversation, not only the last user turn: a follow-up ("Yes, how?") means nothing
        alone. The reranker keeps the end of a context longer than its embedding model reads.
        """
        return "\n".join(f"{turn['role']}: {turn['content']}" for turn in self.turns if turn["role"] != "system")

    def mark(self, response: Response) -> Response:
        """`response` with the dropped-messages header set."""
        response.headers[DROPPED_HEADER] = str(self.dropped)
        return response


def fit_conversation(turns: list[dict], max_tokens: int, tokenizer: TextTokenizer, settings: Settings,
                     reserved_for: str = "max_tokens") -> FittedConversation:
    """The chat-templated prompt of `turns`, without the fewest oldest pairs needed to fit `max_tokens` after it.

    `turns` are validated (`api.models.conversation`): an optional system message, then user and assistant turns
    alternating from the user. Raises ContextLengthError (400) when even the system message and the last
    user turn do not fit; `reserved_for` names what the `max_tokens` after the prompt are for in its message.
    """
    context = context_size(tokenizer, settings)
    system = turns[:1] if turns[0]["role"] == "system" else []
    rest = turns[len(system):]
    last_user = max(index for index, turn in enumerate(rest) if turn["role"] == "user")
    pairs = last_user // 2  # user/assistant pairs before the last user turn: the droppable history

    def attempt(pairs_dropped: int) -> FittedConversation:
        kept = system + rest[2 * pairs_dropped:]
        return FittedConversation(kept, tokenizer.encode_chat(kept), 2 * pairs_dropped)

    def fits(fitted: FittedConversation) -> bool:
        return len(fitted.prompt_ids) + max_tokens <= context

    whole = attempt(0)
    if not whole.prompt_ids:
        raise ValidationError("'messages' renders to no tokens", field="messages")
    if fits(whole):
        return whole
    shortest = attempt(pairs) if pairs else whole
    kept = "the system message and the last user turn" if system else "the last user turn"
    check_context(len(shortest.prompt_ids), max_tokens, context, "messages", reserved_for=reserved_for,
                  prompt=f"even with only {kept} kept, the conversation" if pairs else "the conversation")
    return _fewest_dropped(attempt, fits, pairs, shortest)


def _fewest_dropped(attempt, fits, pairs: int, shortest: FittedConversation) -> FittedConversation:
    """Binary search for the fewest pairs to drop (dropping more never makes the prompt longer).

    Invariant: dropping `high` pairs fits (`best`), dropping `low - 1` does not; log2(pairs) renders.
    """
    low, high, best = 1, pairs, shortest
    while low < high:
        middle = (low + high) // 2
        fitted = attempt(middle)
        if fits(fitted):
            high, best = middle, fitted
        else:
            low = middle + 1
    return best
