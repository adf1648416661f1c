"""Batched beam search on a Decoder, step by step, with the semantics of transformers' `_beam_search`.

Reproduces `generate(num_beams=W, num_return_sequences=W, do_sample=False, length_penalty=..., early_stopping=...)`
of transformers 5 for one prompt:

- each step adds every running beam's score to its log-softmax over the vocabulary and keeps the top
  `K = max(2, 1 + n_eos) * W` candidates over beams x vocab;
- a candidate that ends on an EOS token, or reaches `max_new_tokens`, is finished; only those ranked in
  the top W may join the kept finished hypotheses, scored `sum_logprobs / generated_len ** length_penalty`
  where `generated_len` counts every generated token, the EOS included;
- the best W unfinished candidates run on;
- the search stops when every candidate is finished (the length limit) or when the best running beam,
  normalised by the current generated length, cannot beat the worst of W kept hypotheses (transformers'
  heuristic for `early_stopping=False`; `True` and `"never"` are supported as there).

The beams share the prompt's KV cache: the prompt is prefilled once into slot 0 of a private cache of W
slots (`prefill_chunk` tokens per `step()`, so a long prompt stalls the worker's other work no longer than
the engine's own chunks do; the step with the last chunk makes the first choice), and the first reorder
(every beam's parent is beam 0) copies it to the other slots. Each later step decodes all W beams in one
forward pass over that cache, so the decoder's running batch in its own cache is never touched and a worker
may interleave `step()` with its other work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shared.limits import check_context
from workers.engine.decoder import Decoder
from workers.engine.kv_cache import KVCache
from workers.features.prefill import PromptPrefill

NEG_INF = -1.0e9
"""The large negative score transformers uses to rule a beam or hypothesis out."""


@dataclass(frozen=True, slots=True)
class BeamCandidate:
    """A finished hypothesis: generated token ids (EOS included when it ended on one) and its score."""

    token_ids: list[int]
    score: float  # sum of the tokens' logprobs / len(token_ids) ** length_penalty: transformers' `sequences_scores`
    ended_with_eos: bool


def reorder_slots(cache: KVCache, parents: list[int], length: int) -> None:
    """Make slot i hold what slot `parents[i]` held, for positions `0..length-1` of every layer.

    Gathers into a new tensor first, so a slot that is both a source and a destination is read before
    it is overwritten.
    """
    if parents == list(range(len(parents))) or length == 0:
        return
    index = torch.tensor(parents, device=cache.keys[0].device)
    with torch.inference_mode():
        for tensors in (cache.keys, cache.values):
            for tensor in tensors:  # [slots, kv_heads, capacity, head_dim]
                tensor[: len(parents), :, :length] = tensor[:, :, :length].index_select(0, index)


class BeamSearch:
    """One prompt's beam search: call `step()` until it returns True, then read `results()`."""

    def __init__(self, decoder: Decoder, prompt_ids: list[int], width: int, max_new_tokens: int,
                 length_penalty: float = 1.0, eos_token_ids: list[int] | tuple[int, ...] = (),
                 early_stopping: bool | str = False, prefill_chunk: int | None = None):
        if not prompt_ids:
            raise ValueError("beam search needs at least one prompt token")
        if width < 1 or max_new_tokens < 1:
            raise ValueError("width and max_new_tokens must be at least 1")
        check_context(len(prompt_ids), max_new_tokens, decoder.max_seq_len)
        self.decoder, self.prompt_ids, self.width = decoder, list(prompt_ids), width
        self.max_new_tokens, self.length_penalty = max_new_tokens, length_penalty
        self.eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long, device=decoder.device)
        self.early_stopping = early_stopping
        self.keep = max(2, 1 + len(self.eos)) * width  # K candidates kept per step
        self.cache = decoder.new_cache(width, max_len=len(prompt_ids) + max_new_tokens, static=True)
        self.prompt = PromptPrefill(decoder, self.cache, self.prompt_ids, prefill_chunk)
        device = decoder.device
        self.running_scores = torch.full((width,), NEG_INF, device=device)  # [W] summed logprobs
        self.running_scores[0] = 0.0  # only beam 0 may expand at first: all beams are the same prompt
        self.running_tokens: list[list[int]] = [[] for _ in range(width)]
        self.finished_scores = torch.full((width,), NEG_INF, device=device)  # [W] normalised, best first
        self.finished_tokens: list[list[int]] = [[] for _ in range(width)]
        self.finished_mask = torch.zeros(width, dtype=torch.bool, device=device)  # [W]
        self.can_improve = True
        self.generated = 0  # tokens in every running beam
        self.done = False

    @property
    def stop_reason(self) -> str:
        """Why the search has ended so far ("" while running)."""
        if not self.done:
            return ""
        return "length" if self.generated >= self.max_new_tokens else "converged"

    def _logits(self) -> torch.Tensor | None:
        """Next-token logits `[W, vocab]`: after the prompt's last prefill chunk (None before it), then one
        batched decode step."""
        if not self.prompt.done:
            logits = self.prompt.step()
            return None if logits is None else logits.expand(self.width, -1)
        last = [[beam[-1]] for beam in self.running_tokens]
        tokens = torch.tensor(last, dtype=torch.long, device=self.decoder.device)  # [W, 1]
        position = len(self.prompt_ids) + self.generated - 1
        return self.decoder.model(tokens, self.cache, slice(0, self.width), [position] * self.width)

    def step(self) -> bool:
        """Run one forward pass (a prompt chunk, or all beams' next token) and advance the search by one token
        once the prompt is in; returns whether it has finished."""
        if self.done:
            return True
        logits = self._logits()
        if logits is None:
            return False  # more of the prompt to prefill
        logprobs = F.log_softmax(logits.float(), dim=-1)  # [W, V]
        vocab = logprobs.shape[-1]
        accumulated = (logprobs + self.running_scores[:, None]).reshape(-1)  # [W * V]
        top_scores, top_index = torch.topk(accumulated, k=self.keep)  # [K]
        parents, tokens = top_index // vocab, top_index % vocab
        generated_len = self.generated + 1
        hits = torch.isin(tokens, self.eos) | (generated_len >= self.max_new_tokens)  # [K]
        parent_list, token_list = parents.tolist(), tokens.tolist()
        candidates = [self.running_tokens[p] + [t] for p, t in zip(parent_list, token_list)]
        self._update_finished(top_scores, hits, candidates, generated_len)
        self._update_running(top_scores, hits, candidates, parent_list)
        self.generated = generated_len
        self._check_stop(hits)
        return self.done

    def _update_running(self, top_scores: torch.Tensor, hits: torch.Tensor, candidates: list[list[int]],
                        parents: list[int]) -> None:
        """Keep the best W unfinished candidates and move their parents' caches into their slots."""
        running = top_scores + hits.to(torch.float32) * NEG_INF  # [K]
        chosen = torch.topk(running, k=self.width)[1]  # [W]
        self.running_scores = running[chosen]
        chosen_list = chosen.tolist()
        self.running_tokens = [candidates[i] for i in chosen_list]
        if not bool(hits.all()):  # else the search ends here and the cache is not read again
            filled = len(self.prompt_ids) + self.generated  # positions written so far in every slot
            reorder_slots(self.cache, [parents[i] for i in chosen_list], filled)

    def _update_finished(self, top_scores: torch.Tensor, hits: torch.Tensor, candidates: list[list[int]],
                         generated_len: int) -> None:
        """Merge newly finished top-W candidates into the W kept hypotheses (transformers' merge)."""
        top_w = torch.arange(self.keep, device=hits.device) < self.width
        just_finished = hits & top_w  # [K]
        scores = top_scores / (generated_len ** self.length_penalty)
        full = bool(self.finished_mask.all()) and self.early_stopping is True
        scores = scores + float(full) * NEG_INF + float(not self.can_improve) * NEG_INF
        scores = scores + (~just_finished) * NEG_INF
        merged = torch.cat((self.finished_scores, scores))  # [W + K]
        best = torch.topk(merged, k=self.width)[1]  # [W], best first
        merged_mask = torch.cat((self.finished_mask, just_finished))
        merged_tokens = self.finished_tokens + candidates
        self.finished_scores = merged[best]
        self.finished_mask = merged_mask[best]
        self.finished_tokens = [merged_tokens[i] for i in best.tolist()]

    def _check_stop(self, hits: torch.Tensor) -> None:
        """transformers' `_check_early_stop_heuristic` and `_beam_search_has_unfinished_sequences`."""
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            best_length = self.max_new_tokens
        else:
            best_length = self.generated
        best_possible = self.running_scores[:1] / (best_length ** self.length_penalty)  # [1]
        worst_finished = torch.where(self.finished_mask, self.finished_scores.min(), NEG_INF)  # [W]
        self.can_improve = self.can_improve and bool((best_possible > worst_finished).any())
        open_beam = not (bool(self.finished_mask.all()) and self.early_stopping is True)
        self.done = not (self.can_improve and open_beam and not bool(hits.all()))

    def results(self) -> list[BeamCandidate]:
        """The finished hypotheses, best first (all W once `step()` has returned True)."""
        eos = set(self.eos.tolist())
        return [BeamCandidate(tokens, score, tokens[-1] in eos)
                for tokens, score, finished in zip(self.finished_tokens, self.finished_scores.tolist(),
                                                   self.finished_mask.tolist())
                if finished]

    def run(self) -> list[BeamCandidate]:
        """Step until the search ends; the W returned candidates, best first."""
        while not self.step():
            pass
        return self.results()


def beam_search(decoder: Decoder, prompt_ids: list[int], width: int, max_new_tokens: int,
                length_penalty: float = 1.0, eos_token_ids: list[int] | tuple[int, ...] = (),
                early_stopping: bool | str = False, prefill_chunk: int | None = None) -> list[BeamCandidate]:
    """Convenience: run a whole beam search and return its candidates, best first."""
    return BeamSearch(decoder, prompt_ids, width, max_new_tokens, length_penalty, eos_token_ids,
                      early_stopping, prefill_chunk).run()
