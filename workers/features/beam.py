"""Beam search as rows of the running batch, with the semantics of transformers' `_beam_search`.

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

`BeamSearch` is that algorithm alone: logits in, the beams' parents and tokens out. `BeamGroup` runs it as W rows
of the engine's batch (`workers/engine/groups.py`): the prompt is prefilled once, like any prompt, and its
logits make the first choice (every beam's parent is the prompt's row, so the rows fork from it); then every
decode step of the batch feeds the W beams' last tokens through the same decode step as every other sequence,
and a beam that continues another takes a copy of its cache within the batch. So a beam of width 1 is greedy
decoding, token for token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shared.limits import check_context
from workers.engine.groups import RowGroup
from workers.engine.sequence import FinishReason

NEG_INF = -1.0e9
"""The large negative score transformers uses to rule a beam or hypothesis out."""


@dataclass(frozen=True, slots=True)
class BeamCandidate:
    """A finished hypothesis: generated token ids (EOS included when it ended on one) and its score."""

    token_ids: list[int]
    score: float  # sum of the tokens' logprobs / len(token_ids) ** length_penalty: transformers' `sequences_scores`
    ended_with_eos: bool


class BeamSearch:
    """One prompt's beam search decisions: `advance` with each step's logits until `done`, then read `results()`."""

    def __init__(self, width: int, max_new_tokens: int, length_penalty: float = 1.0,
                 eos_token_ids: list[int] | tuple[int, ...] = (), early_stopping: bool | str = False,
                 device: torch.device | str = "cpu"):
        if width < 1 or max_new_tokens < 1:
            raise ValueError("width and max_new_tokens must be at least 1")
        self.width, self.max_new_tokens, self.length_penalty = width, max_new_tokens, length_penalty
        self.eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long, device=device)
        self.early_stopping = early_stopping
        self.keep = max(2, 1 + len(self.eos)) * width  # K candidates kept per step
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

    def advance(self, logits: torch.Tensor) -> list[int]:
        """Choose the next W running beams from the running beams' next-token logits `[W, vocab]`: the running
        beam each continues (its parent; `running_tokens` then hold their tokens). Sets `done` at the end."""
        if self.done:
            raise ValueError("the beam search has ended")
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
        chosen_parents = self._update_running(top_scores, hits, candidates, parent_list)
        self.generated = generated_len
        self._check_stop(hits)
        return chosen_parents

    def _update_running(self, top_scores: torch.Tensor, hits: torch.Tensor, candidates: list[list[int]],
                        parents: list[int]) -> list[int]:
        """Keep the best W unfinished candidates; the parent of each."""
        running = top_scores + hits.to(torch.float32) * NEG_INF  # [K]
        chosen = torch.topk(running, k=self.width)[1]  # [W]
        self.running_scores = running[chosen]
        chosen_list = chosen.tolist()
        self.running_tokens = [candidates[i] for i in chosen_list]
        return [parents[i] for i in chosen_list]

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
        """The finished hypotheses, best first (all W once `done`)."""
        eos = set(self.eos.tolist())
        return [BeamCandidate(tokens, score, tokens[-1] in eos)
                for tokens, score, finished in zip(self.finished_tokens, self.finished_scores.tolist(),
                                                   self.finished_mask.tolist())
                if finished]


class BeamGroup(RowGroup):
    """A beam search as `search.width` rows of the running batch (one per beam)."""

    def __init__(self, group_id: str, prompt_ids: list[int], search: BeamSearch, max_seq_len: int):
        check_context(len(prompt_ids), search.max_new_tokens, max_seq_len)
        super().__init__(group_id, prompt_ids, search.width, search.max_new_tokens)
        self.search = search

    def start(self, logits: torch.Tensor) -> list[int] | None:
        """The first choice: every beam continues the prompt (the prompt's logits for each)."""
        return self.advance(logits.expand(self.width, -1))

    def advance(self, logits: torch.Tensor) -> list[int] | None:
        parents = self.search.advance(logits)
        if self.search.done:
            self.finish_reason = FinishReason.DONE
            return None
        return parents

    def row_tokens(self) -> list[list[int]]:
        return self.search.running_tokens

    def results(self) -> list[BeamCandidate]:
        """The candidates, best first (once finished)."""
        return self.search.results()
