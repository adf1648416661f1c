"""How likely the model finds given continuations of a prompt, normalised as beam search normalises.

`score_candidates` is what the /rerank_scores debug route shows next to the reranker's relevance: for
each candidate, `sum(log p(token | prompt, earlier tokens)) / len(candidate) ** length_penalty`, which
for a beam search candidate equals the `score` beam search reported for it. The prompt is prefilled
once into slot 0 of a private cache and copied to one slot per candidate; the candidates then run as
padded prefill passes, so the decoder's running batch (its own cache) is never touched.

`CandidateScorer` does this one forward pass per `step()`, so a worker interleaves it with its batch: the
prompt one `prefill_chunk` at a time, then the candidates' tokens, at most a chunk's worth per pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shared.limits import check_context
from workers.engine.decoder import Decoder
from workers.features.prefill import PromptPrefill

MAX_LOGITS_PER_PASS = 32 * 1024 * 1024
"""Bound on rows x tokens x vocab logits held at once (128 MiB in fp32); more candidates run in groups."""


class CandidateScorer:
    """Per-token log-probabilities of each candidate continuation of a prompt: `step()` until it returns True."""

    def __init__(self, decoder: Decoder, prompt_ids: list[int], candidates: list[list[int]],
                 prefill_chunk: int | None = None):
        if not prompt_ids:
            raise ValueError("scoring needs at least one prompt token")
        if not candidates:
            raise ValueError("scoring needs at least one candidate")
        if any(not candidate for candidate in candidates):
            raise ValueError("every candidate needs at least one token")
        longest = max(len(c) for c in candidates)
        check_context(len(prompt_ids), longest, decoder.max_seq_len, field="candidates")
        self.decoder, self.prompt_len, self.candidates = decoder, len(prompt_ids), candidates
        self.chunk = prefill_chunk
        per_group = max(1, MAX_LOGITS_PER_PASS // (max(longest - 1, 1) * decoder.config.vocab_size))
        self.groups = [range(first, min(first + per_group, len(candidates)))
                       for first in range(0, len(candidates), per_group)]
        # One cache for every group: each writes only past the prompt, so the prompt is prefilled once.
        self.cache = decoder.new_cache(len(self.groups[0]), max_len=self.prompt_len + longest, static=True)
        self.prompt = PromptPrefill(decoder, self.cache, prompt_ids, prefill_chunk)
        self.pieces: list[list[torch.Tensor]] = [[] for _ in candidates]  # each candidate's logprobs so far
        self.group = 0  # the group being fed
        self.fed = 0  # tokens of the group's candidates fed so far

    @property
    def done(self) -> bool:
        """Whether every candidate is scored."""
        return self.prompt.done and self.group == len(self.groups)

    def step(self) -> bool:
        """One forward pass: a chunk of the prompt, or a chunk of a group of candidates; returns `done`."""
        if not self.prompt.done:
            logits = self.prompt.step()
            if logits is not None:
                self._start(F.log_softmax(logits[0].float(), dim=-1))  # [V]
        elif not self.done:
            self._feed()
        return self.done

    def _start(self, first: torch.Tensor) -> None:
        """The prompt is in: score each candidate's first token, give every slot the prompt."""
        for slot in range(1, self.cache.max_slots):
            self.cache.copy_slot(0, slot, self.prompt_len)
        for pieces, candidate in zip(self.pieces, self.candidates):
            pieces.append(first[torch.tensor(candidate[:1], device=first.device)].cpu())
        self._next_group(0)

    def _next_group(self, group: int) -> None:
        """Move on to `group`, past groups whose candidates are single tokens (nothing more to feed)."""
        while group < len(self.groups) and max(len(self.candidates[i]) for i in self.groups[group]) == 1:
            group += 1
        self.group, self.fed = group, 0

    def _feed(self) -> None:
        """Feed the next columns of the group's candidates (all but each one's last token; padding at the end
        is never attended to) and score the tokens they predict."""
        rows = [self.candidates[i] for i in self.groups[self.group]]
        width = max(len(c) for c in rows) - 1  # tokens each row feeds in all
        start = self.fed
        end = min(width, start + max(1, self.chunk // len(rows))) if self.chunk else width
        fed = [(c[:-1] + [0] * (width + 1 - len(c)))[start:end] for c in rows]
        tokens = torch.tensor(fed, dtype=torch.long, device=self.decoder.device)  # [N, end - start]
        logits = self.decoder.model(tokens, self.cache, slice(0, len(rows)), [self.prompt_len + start] * len(rows),
                                    last_only=False)
        logprobs = F.log_softmax(logits.float(), dim=-1)  # [N, end - start, V]
        for row, index in enumerate(self.groups[self.group]):
            targets = self.candidates[index][start + 1: end + 1]  # what columns start.. predict
            if targets:
                ids = torch.tensor(targets, dtype=torch.long, device=logprobs.device)
                columns = torch.arange(len(targets), device=logprobs.device)
                self.pieces[index].append(logprobs[row, columns, ids].cpu())
        self.fed = end
        if end == width:
            self._next_group(self.group + 1)

    def logprobs(self) -> list[torch.Tensor]:
        """Each candidate's per-token log-probabilities `[len(candidate)]` (once `step()` returned True)."""
        return [torch.cat(pieces) for pieces in self.pieces]

    def scores(self, length_penalty: float = 1.0) -> list[float]:
        """Length-normalised log-probability of each candidate: `sum logprob / len ** length_penalty`."""
        return [float(row.sum() / (len(row) ** length_penalty)) for row in self.logprobs()]


def candidate_logprobs(decoder: Decoder, prompt_ids: list[int], candidates: list[list[int]]) -> list[torch.Tensor]:
    """Per-token log-probabilities `[len(candidate)]` of each candidate continuation of `prompt_ids`."""
    scorer = CandidateScorer(decoder, prompt_ids, candidates)
    while not scorer.step():
        pass
    return scorer.logprobs()


def score_candidates(decoder: Decoder, prompt_ids: list[int], candidate_ids_list: list[list[int]],
                     length_penalty: float = 1.0, prefill_chunk: int | None = None) -> list[float]:
    """Length-normalised log-probability of each candidate: `sum logprob / len ** length_penalty`."""
    scorer = CandidateScorer(decoder, prompt_ids, candidate_ids_list, prefill_chunk)
    while not scorer.step():
        pass
    return scorer.scores(length_penalty)
