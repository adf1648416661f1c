"""Per-sequence sampling over a batch of logits: repetition penalty, temperature, top-k, top-p, seed.

Each row keeps its own parameters and its own random generator, so a seeded sequence draws the same
tokens whatever else shares its batch. Sampling uses the exponential race (`argmax(p / Exp(1))`), which
draws from `p` with one random vector and no cumulative search (as gpt-fast, nano-vllm and TGI do).

Everything runs on the logits' device, rows together: the only transfer to the host is the sampled ids,
once per call (on a GPU the `[batch, vocab]` logits never leave it).
"""

from __future__ import annotations

import secrets

import torch

from shared.sampling import SamplingParams


class SamplingState:
    """One sequence's parameters, random generator and the tokens the repetition penalty looks at."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int]):
        self.params = params
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        self._generators: dict[torch.device, torch.Generator] = {}
        self.seen: set[int] = set(prompt_ids) if params.repetition_penalty != 1.0 else set()

    def generator(self, device: torch.device) -> torch.Generator:
        """The sequence's random generator on `device`, seeded with its seed (each device draws its own stream)."""
        generator = self._generators.get(device)
        if generator is None:
            generator = self._generators[device] = torch.Generator(device).manual_seed(self.seed)
        return generator

    def observe(self, token: int) -> None:
        """Remember a generated token for the repetition penalty."""
        if self.params.repetition_penalty != 1.0:
            self.seen.add(token)


def on_device(values: list, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A small host list as a tensor on `device`, copied without waiting for the device's queued work (a plain
    `torch.tensor(..., device=cuda)` synchronises); on the CPU, just the tensor."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


MIN_TEMPERATURE = 1e-3
"""A smaller positive temperature is clamped to this: dividing logits by 1e-300 gives inf, then NaN; at 1e-3
sampling is already greedy in effect."""


def apply_repetition_penalties(logits: torch.Tensor, states: list[SamplingState]) -> None:
    """transformers' rule, in place on rows `[B, V]`: divide positive logits of each row's seen tokens by its
    penalty, multiply negative ones; one gather and one scatter for the whole batch."""
    rows, ids, penalties = [], [], []
    for row, state in enumerate(states):
        seen = sorted(state.seen)
        rows += [row] * len(seen)
        ids += seen
        penalties += [state.params.repetition_penalty] * len(seen)
    if not rows:
        return
    device = logits.device
    rows, ids = on_device(rows, device), on_device(ids, device)
    penalty = on_device(penalties, device, logits.dtype)
    scores = logits[rows, ids]
    logits[rows, ids] = torch.where(scores < 0, scores * penalty, scores / penalty)


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask each row `[B, V]` to its `top_k` best tokens (0: all) and then its `top_p` nucleus."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)[None, :]
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


def race(probs: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """One draw per row of `probs` `[S, V]` by the exponential race; row i's noise comes from `states[i]`'s
    generator alone, so its draw does not depend on the other rows."""
    noise = torch.empty_like(probs)
    for index, state in enumerate(states):
        noise[index].exponential_(generator=state.generator(probs.device))
    return (probs / noise).argmax(dim=-1)


def sample(logits: torch.Tensor, states: list[SamplingState]) -> list[int]:
    """Next token of each row of `logits` `[B, V]` by that row's sampling state."""
    # A copy: the penalty below writes in place, and the model's logits are inference-mode tensors.
    logits = logits.to(torch.float32, copy=True)
    device = logits.device
    apply_repetition_penalties(logits, states)
    tokens = logits.argmax(dim=-1)
    sampled = [row for row, state in enumerate(states) if not state.params.greedy]
    if sampled:
        params = [states[row].params for row in sampled]
        temperatures = on_device([max(p.temperature, MIN_TEMPERATURE) for p in params], device)
        rows = on_device(sampled, device)
        scaled = logits[rows] / temperatures[:, None]
        if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
            scaled = filter_top_k_top_p(scaled, on_device([p.top_k for p in params], device),
                                        on_device([p.top_p for p in params], device))
        tokens[rows] = race(scaled.softmax(dim=-1), [states[row] for row in sampled])
    return tokens.tolist()  # the one transfer to the host
