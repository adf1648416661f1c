"""Beam search and scoring as they ran before they became rows of the batch, each on an eager private KV cache
of its own: the reference the batch-row implementation is checked against. Nothing serves this way any more.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workers.engine.decoder import Decoder
from workers.engine.kv_cache import KVCache
from workers.features.beam import BeamCandidate, BeamSearch


def private_cache(decoder: Decoder, slots: int, max_len: int) -> KVCache:
    """A static cache of `slots` slots beside the decoder's own."""
    config = decoder.config
    return KVCache(num_layers=config.num_layers, max_slots=slots, num_kv_heads=config.num_kv_heads,
                   head_dim=config.head_dim, max_len=max_len, dtype=decoder.cache_dtype or decoder.dtype,
                   device=decoder.device, static=True)


def reorder_slots(cache: KVCache, parents: list[int], length: int) -> None:
    """Make slot i hold what slot `parents[i]` held (a gather, so a slot both read and written is read first)."""
    index = torch.tensor(parents, device=cache.keys[0].device)
    with torch.inference_mode():
        for tensors in (cache.keys, cache.values):
            for tensor in tensors:  # [slots, kv_heads, capacity, head_dim]
                tensor[: len(parents), :, :length] = tensor[:, :, :length].index_select(0, index)


def reference_beam_search(decoder: Decoder, prompt_ids: list[int], search: BeamSearch) -> list[BeamCandidate]:
    """The search's candidates, its W beams decoded together in one eager forward pass a step on a private cache."""
    width, filled = search.width, len(prompt_ids)
    cache = private_cache(decoder, width, filled + search.max_new_tokens)
    tokens = torch.tensor([prompt_ids], device=decoder.device)
    parents = search.advance(decoder.model(tokens, cache, slice(0, 1), [0]).expand(width, -1))
    while not search.done:
        reorder_slots(cache, parents, filled)
        tokens = torch.tensor([[beam[-1]] for beam in search.running_tokens], device=decoder.device)  # [W, 1]
        logits = decoder.model(tokens, cache, slice(0, width), [filled] * width)
        filled += 1
        parents = search.advance(logits)
    return search.results()


def reference_scores(decoder: Decoder, prompt_ids: list[int], candidates: list[list[int]],
                     length_penalty: float = 1.0) -> list[float]:
    """Each candidate's length-normalised log-probability, from one eager pass over prompt + candidate."""
    scores = []
    for candidate in candidates:
        cache = private_cache(decoder, 1, len(prompt_ids) + len(candidate))
        tokens = torch.tensor([prompt_ids + candidate[:-1]], device=decoder.device)
        logits = decoder.model(tokens, cache, slice(0, 1), [0], last_only=False)[0, len(prompt_ids) - 1:]
        logprobs = F.log_softmax(logits.float(), dim=-1)[torch.arange(len(candidate)), torch.tensor(candidate)]
        scores.append(float(logprobs.sum() / len(candidate) ** length_penalty))
    return scores
