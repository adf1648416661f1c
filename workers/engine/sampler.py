"""Per-sequence sampling over a batch of logits: repetition penalty, temperature, top-k, top-p, seed.

Each row keeps its own parameters and its own random generator, so a seeded sequence draws the same
tokens whatever else shares its batch. Sampling uses the exponential race (`argmax(p / Exp(1))`), which
draws from `p` with one random vector and no cumulative search (as gpt-fast, nano-vllm and TGI do).
"""

from __future__ import annotations

import secrets

import torch

from shared.sampling import SamplingParams


class SamplingState:
    """One sequence's parameters, random generator and the tokens the repetition penalty looks at."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int]):
        self.params = params
        self.generator = torch.Generator().manual_seed(
            params.seed if params.seed is not None else secrets.randbits(63))
        self.seen: set[int] = set(prompt_ids) if params.repetition_penalty != 1.0 else set()

    def observe(self, token: int) -> None:
        """Remember a generated token for the repetition penalty."""
        if self.params.repetition_penalty != 1.0:
            self.seen.add(token)


MIN_TEMPERATURE = 1e-3
"""A smaller positive temperature is clamped to this: dividing logits by 1e-300 gives inf, then NaN; at 1e-3
sampling is already greedy in effect."""


def apply_repetition_penalty(logits: torch.Tensor, seen: set[int], penalty: float) -> None:
    """transformers' rule, in place: divide positive logits of seen tokens by `penalty`, multiply negative."""
    if not seen:
        return
    ids = torch.tensor(sorted(seen), dtype=torch.long)
    scores = logits[ids]
    logits[ids] = torch.where(scores < 0, scores * penalty, scores / penalty)


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask each row `[B, V]` to its `top_k` best tokens (0: all) and then its `top_p` nucleus."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1])[None, :]
    outside_k = (top_k[:, None] > 0) & (ranks >= top_k[:, None])
    sorted_logits = sorted_logits.masked_fill(outside_k, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # Remove a token when the tokens ranked above it already cover top_p (the best one always stays).
    # Rows with top_p 1 keep everything: rounding lets the cumulative sum pass 1.0 before the tail.
    # Rank 0 is exempt outright: a top_p below float32's range (1e-300) rounds to 0, and rounding can then
    # put the best token "outside" too, leaving nothing but -inf (NaN probabilities, token 0 forever).
    outside_p = ((probs.cumsum(dim=-1) - probs) > top_p[:, None]) & (top_p[:, None] < 1.0) & (ranks > 0)
    sorted_logits = sorted_logits.masked_fill(outside_p, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample(logits: torch.Tensor, states: list[SamplingState]) -> list[int]:
    """Next token of each row of `logits` `[B, V]` by that row's sampling state."""
    # A copy: the penalty below writes in place, and the model's logits are inference-mode tensors.
    logits = logits.to("cpu", torch.float32, copy=True)
    for row, state in enumerate(states):
        apply_repetition_penalty(logits[row], state.seen, state.params.repetition_penalty)
    tokens = logits.argmax(dim=-1).tolist()
    sampled = [row for row, state in enumerate(states) if not state.params.greedy]
    if not sampled:
        return tokens
    params = [states[row].params for row in sampled]
    temperatures = torch.tensor([max(p.temperature, MIN_TEMPERATURE) for p in params])
    scaled = logits[sampled] / temperatures[:, None]
    if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
        scaled = filter_top_k_top_p(scaled, torch.tensor([p.top_k for p in params]),
                                    torch.tensor([p.top_p for p in params]))
    probs = scaled.softmax(dim=-1)
    for index, row in enumerate(sampled):
        race = torch.empty_like(probs[index]).exponential_(generator=states[row].generator)
        tokens[row] = int((probs[index] / race).argmax())
    return tokens
