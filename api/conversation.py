"""A conversation as a prompt: rendered with the model's chat template and fitted to the context.

History that does not fit (with the tokens asked for) loses its oldest user/assistant pairs, whole, so
the turns still alternate; the system message and the last user turn are always kept. How many
messages went is reported to the client (`X-Messages-Dropped`), never hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

from flask import Response

from shared.exceptions import ContextLengthError, ValidationError
from shared.settings import Settings
from shared.tokenizer import TextTokenizer

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

    `turns` are validated (`api.chat_schemas`): an optional system message, then user and assistant turns
    alternating from the user. Raises ContextLengthError (400) when even the system message and the last
    user turn do not fit; `reserved_for` names what the `max_tokens` after the prompt are for in its message.
    """
    context = min(tokenizer.context_length, settings.max_seq_len)
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
    if not fits(shortest):
        kept = "the system message and the last user turn" if system else "the last user turn"
        prefix = f"even with only {kept} kept, " if pairs else ""
        raise ContextLengthError(
            f"{prefix}the conversation has {len(shortest.prompt_ids)} tokens and {reserved_for} is {max_tokens}: "
            f"together they exceed the context of {context} tokens", field="messages")
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
