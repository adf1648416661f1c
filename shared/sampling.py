"""Sampling parameters: validated once by the API (`api.models.fields`), carried in the job payload, applied
by the worker."""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_STOP_SEQUENCES = 4
"""As in OpenAI's API: at most four stop strings."""


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick each next token and when to stop. temperature 0 means greedy."""

    max_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    @property
    def greedy(self) -> bool:
        """Whether the next token is simply the most likely one."""
        return self.temperature == 0.0 or self.top_k == 1
