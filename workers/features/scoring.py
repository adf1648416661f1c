"""How likely the model finds given continuations of a prompt, normalised as beam search normalises.

`score_candidates` is what the /rerank_scores debug route shows next to the reranker's relevance: for
each candidate, `sum(log p(token | prompt, earlier tokens)) / len(candidate) ** length_penalty`, which
for a beam search candidate equals the `score` beam search reported for it. The prompt is prefilled
once into a private cache, copied to one slot per candidate, and all candidates then run as one padded
prefill pass, so the decoder's running batch (its own cache) is never touched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shared.limits import check_context
from workers.engine.decoder import Decoder

MAX_LOGITS_PER_PASS = 32 * 1024 * 1024
"""Bound on rows x tokens x vocab logits held at once (128 MiB in fp32); more candidates run in groups."""


def candidate_logprobs(decoder: Decoder, prompt_ids: list[int], candidates: list[list[int]]) -> list[torch.Tensor]:
    """Per-token log-probabilities `[len(candidate)]` of each candidate continuation of `prompt_ids`."""
    if not prompt_ids:
        raise ValueError("scoring needs at least one prompt token")
    if any(not candidate for candidate in candidates):
        raise ValueError("every candidate needs at least one token")
    longest = max((len(c) for c in candidates), default=0)
    check_context(len(prompt_ids), longest, decoder.max_seq_len, field="candidates")
    vocab = decoder.config.vocab_size
    group = max(1, MAX_LOGITS_PER_PASS // (max(longest - 1, 1) * vocab))
    out: list[torch.Tensor] = []
    for first in range(0, len(candidates), group):
        out.extend(_group_logprobs(decoder, prompt_ids, candidates[first: first + group]))
    return out


def _group_logprobs(decoder: Decoder, prompt_ids: list[int], candidates: list[list[int]]) -> list[torch.Tensor]:
    """`candidate_logprobs` for candidates that run together in one padded pass."""
    prompt_len, rows = len(prompt_ids), len(candidates)
    longest = max(len(c) for c in candidates)
    cache = decoder.new_cache(rows, max_len=prompt_len + longest, static=True)
    prompt = torch.tensor([prompt_ids], dtype=torch.long, device=decoder.device)
    first = F.log_softmax(decoder.model(prompt, cache, slice(0, 1), [0])[0].float(), dim=-1)  # [V]
    for slot in range(1, rows):
        cache.copy_slot(0, slot, prompt_len)
    later = None
    if longest > 1:  # feed all but each candidate's last token; padding at the end is never attended to
        fed = [c[:-1] + [0] * (longest - len(c)) for c in candidates]
        tokens = torch.tensor(fed, dtype=torch.long, device=decoder.device)  # [N, T - 1]
        logits = decoder.model(tokens, cache, slice(0, rows), [prompt_len] * rows, last_only=False)
        later = F.log_softmax(logits.float(), dim=-1)  # [N, T - 1, V]
    out = []
    for row, candidate in enumerate(candidates):
        ids = torch.tensor(candidate, dtype=torch.long, device=first.device)
        head = first[ids[:1]]  # [1]
        tail = later[row, torch.arange(len(candidate) - 1), ids[1:]] if later is not None else head[:0]
        out.append(torch.cat((head, tail)).cpu())
    return out


def score_candidates(decoder: Decoder, prompt_ids: list[int], candidate_ids_list: list[list[int]],
                     length_penalty: float = 1.0) -> list[float]:
    """Length-normalised log-probability of each candidate: `sum logprob / len ** length_penalty`."""
    logprobs = candidate_logprobs(decoder, prompt_ids, candidate_ids_list)
    return [float(row.sum() / (len(row) ** length_penalty)) for row in logprobs]
