"""Greedy and next-token agreement between two decoders, used by bench.precision_ablation and the engine tests.

Greedy agreement over a few prompts is no longer an acceptance measure (on a model with many near-ties it
measures luck); bench.int8_quality measures fidelity by KL divergence instead.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bench.int8_quality import position_logits

CHAT_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain recursion to a child.",
    "Give me three tips for learning to cook.",
)
RAW_PROMPTS = (
    "The history of the Roman Empire",
    "def fibonacci(n):\n",
    "Once upon a time, in a small village",
    "The best way to learn a new language is",
)


def top1_agreement(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """Share of positions where both pick the same most likely next token."""
    return (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()


def confident_agreement(logits: torch.Tensor, reference: torch.Tensor, threshold: float = 0.5) -> float:
    """Top-1 agreement at the positions where the reference gives its top token at least `threshold`."""
    confident = reference.float().softmax(-1).amax(-1) >= threshold
    return (logits.argmax(-1) == reference.argmax(-1))[confident].float().mean().item()


def teacher_forced_logits(decoder, prompt_ids: list[int], output_ids: list[int]) -> torch.Tensor:
    """Logits `[len(output_ids), vocab]` that predicted each output token, given the tokens before it."""
    ids = prompt_ids + output_ids
    return position_logits(decoder, ids[:-1])[len(prompt_ids) - 1:]


def agreement_length(output: list[int], reference: list[int]) -> int:
    """How many leading tokens the two outputs share (the index of the first divergence)."""
    for index, (a, b) in enumerate(zip(output, reference)):
        if a != b:
            return index
    return min(len(output), len(reference))


def greedy_outputs(decoder, tokenizer, prompt_ids: list[list[int]], tokens: int) -> list[list[int]]:
    """Greedy output ids (up to EOS or `tokens`) of every prompt, decoded as one batch."""
    from shared.sampling import SamplingParams
    from workers.engine.engine import Engine
    from workers.engine.sequence import Sequence

    engine = Engine(decoder, tokenizer.backend, tokenizer.eos_token_ids)
    params = SamplingParams(max_tokens=tokens, temperature=0.0)
    sequences = [Sequence(str(i), ids, params, tokenizer.backend) for i, ids in enumerate(prompt_ids)]
    return [s.output_ids for s in engine.run(sequences)]


def perplexity(logits: torch.Tensor, ids: list[int]) -> float:
    """exp(mean negative log-likelihood) of ids[1:] under the logits of the positions before them."""
    return math.exp(F.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:], device=logits.device)).item())
