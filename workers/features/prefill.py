"""A prompt prefilled into slot 0 of a private KV cache one chunk per call, as the engine prefills its prompts.

Beam search and scoring run beside the running batch, one forward pass per worker step; prefilling a long
prompt in one pass would stall every stream on the worker for all of it, so they take `PREFILL_CHUNK`
tokens a step like everyone else. A prompt within one chunk is prefilled in one pass, as before.
"""

from __future__ import annotations

import torch

from workers.engine.decoder import Decoder
from workers.engine.kv_cache import KVCache


class PromptPrefill:
    """Feeds `prompt_ids` into slot 0 of `cache`, `chunk` tokens per `step()` (None: all in one)."""

    def __init__(self, decoder: Decoder, cache: KVCache, prompt_ids: list[int], chunk: int | None = None):
        if chunk is not None and chunk < 1:
            raise ValueError("the prefill chunk must be at least one token")
        self.decoder, self.cache, self.prompt_ids = decoder, cache, prompt_ids
        self.chunk = chunk or len(prompt_ids)
        self.filled = 0  # prompt tokens in the cache so far

    @property
    def done(self) -> bool:
        """Whether the whole prompt is in the cache."""
        return self.filled == len(self.prompt_ids)

    def step(self) -> torch.Tensor | None:
        """Prefill the next chunk; after the last one, the next token's logits `[1, vocab]` (else None)."""
        start = self.filled
        chunk = self.prompt_ids[start: start + self.chunk]
        tokens = torch.tensor([chunk], dtype=torch.long, device=self.decoder.device)  # [1, T]
        logits = self.decoder.model(tokens, self.cache, slice(0, 1), [start])
        self.filled += len(chunk)
        return logits if self.done else None
