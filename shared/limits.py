"""Limits a request must fit, checked the same way by the API (before enqueueing) and by the workers."""

from __future__ import annotations

from shared.exceptions import ContextLengthError


def check_context(prompt_tokens: int, max_new_tokens: int, context: int, field: str = "prompt", *,
                  prompt: str = "the prompt", reserved_for: str = "max_tokens") -> None:
    """Refuse a prompt that, with the tokens asked for, does not fit a context of `context` tokens.

    `prompt` and `reserved_for` name the two in the message (say, "the conversation" and "the longest
    candidate's token count").
    """
    if prompt_tokens + max_new_tokens > context:
        raise ContextLengthError(
            f"{prompt} has {prompt_tokens} tokens and {reserved_for} is {max_new_tokens}: together they exceed "
            f"the context of {context} tokens", field=field)
