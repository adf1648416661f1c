"""How likely the model finds given continuations of a prompt, normalised as beam search normalises.

For each candidate, `sum(log p(token | prompt, earlier tokens)) / len(candidate) ** length_penalty`, which for
a beam search candidate equals the `score` beam search reported for it (up to rounding: beams are decoded a
token a step, candidates are fed as a prefill). It is what the /rerank_scores debug route shows next to the
reranker's relevance.

`ScoreGroup` runs as rows of the engine's batch (`workers/engine/groups.py`): the prompt is prefilled once,
like any prompt, and its logits score every candidate's first token; the prompt's cache is then copied to one
row per candidate longer than a token, and the candidates' tokens are fed to those rows as a prefill, at most
a prefill chunk's worth of tokens a step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shared.limits import check_context
from workers.engine.groups import RowGroup
from workers.engine.sequence import FinishReason


class ScoreGroup(RowGroup):
    """Per-token log-probabilities of each candidate continuation of a prompt, as rows of the batch."""

    decodes = False

    def __init__(self, group_id: str, prompt_ids: list[int], candidates: list[list[int]], max_seq_len: int):
        if not candidates:
            raise ValueError("scoring needs at least one candidate")
        if any(not candidate for candidate in candidates):
            raise ValueError("every candidate needs at least one token")
        longest = max(len(c) for c in candidates)
        check_context(len(prompt_ids), longest, max_seq_len, field="candidates")
        self.candidates = candidates
        self.fed_candidates = [index for index, candidate in enumerate(candidates) if len(candidate) > 1]
        super().__init__(group_id, prompt_ids, max(1, len(self.fed_candidates)), longest)
        self.pieces: list[list[torch.Tensor]] = [[] for _ in candidates]  # each candidate's logprobs so far
        self.started = False
        self.fed = 0  # tokens fed to every row so far

    def prefill_rows(self) -> tuple[int, int]:
        if not self.started:
            return super().prefill_rows()
        return self.width, len(self.prompt_ids) + self.fed

    def start(self, logits: torch.Tensor) -> None:
        """The prompt is in: score each candidate's first token (its rows get the prompt's cache next)."""
        first = F.log_softmax(logits[0].float(), dim=-1)  # [V]
        for pieces, candidate in zip(self.pieces, self.candidates):
            pieces.append(first[torch.tensor(candidate[:1], device=first.device)].cpu())
        self.started = True
        if not self.fed_candidates:
            self.finish_reason = FinishReason.DONE

    def _rows(self) -> tuple[list[list[int]], int]:
        """The fed candidates, and the tokens each row feeds in all (every candidate's but its last)."""
        rows = [self.candidates[index] for index in self.fed_candidates]
        return rows, max(len(c) for c in rows) - 1

    def next_feed(self, budget: int) -> tuple[list[list[int]], int]:
        """The next columns of the candidates' tokens (padding at the end of a shorter one is never attended to)."""
        rows, width = self._rows()
        end = min(width, self.fed + max(1, budget // len(rows)))
        fed = [(c[:-1] + [0] * (width + 1 - len(c)))[self.fed: end] for c in rows]
        return fed, len(self.prompt_ids) + self.fed

    def take_fed(self, logits: torch.Tensor) -> None:
        """Score the tokens that the fed columns predict."""
        logprobs = F.log_softmax(logits.float(), dim=-1)  # [N, T, V]
        end = self.fed + logprobs.shape[1]
        for row, index in enumerate(self.fed_candidates):
            targets = self.candidates[index][self.fed + 1: end + 1]  # what columns fed.. predict
            if targets:
                ids = torch.tensor(targets, dtype=torch.long, device=logprobs.device)
                columns = torch.arange(len(targets), device=logprobs.device)
                self.pieces[index].append(logprobs[row, columns, ids].cpu())
        self.fed = end
        if end == self._rows()[1]:
            self.finish_reason = FinishReason.DONE

    def logprobs(self) -> list[torch.Tensor]:
        """Each candidate's per-token log-probabilities `[len(candidate)]` (once finished)."""
        return [torch.cat(pieces) for pieces in self.pieces]

    def scores(self, length_penalty: float = 1.0) -> list[float]:
        """Length-normalised log-probability of each candidate: `sum logprob / len ** length_penalty`."""
        return [float(row.sum() / (len(row) ** length_penalty)) for row in self.logprobs()]
