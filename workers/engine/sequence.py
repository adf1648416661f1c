"""One request's state inside the engine: its prompt, what it has generated, and how it will stop."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from tokenizers import Tokenizer

from shared.sampling import SamplingParams
from workers.engine.detokenizer import IncrementalDetokenizer, StopFilter
from workers.engine.sampler import SamplingState


class FinishReason(str, enum.Enum):
    """Why a sequence ended."""

    LENGTH = "length"
    STOP = "stop"
    EOS = "eos"
    CANCELLED = "cancelled"
    FAILED = "failed"  # its own work raised (see `Sequence.error`); the rest of the batch went on
    DONE = "done"  # a group (beam search, scoring: workers/engine/groups.py) has its results


class Sequence:
    """A prompt being prefilled or decoded, with its sampler, detokenizer and stop filter."""

    width = 1
    """Rows of the batch it holds (a group, workers/engine/groups.py, holds several)."""

    def __init__(self, sequence_id: str, prompt_ids: list[int], params: SamplingParams, tokenizer: Tokenizer):
        if not prompt_ids:
            raise ValueError("a sequence needs at least one prompt token")
        self.id = sequence_id
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.sampling = SamplingState(params, prompt_ids)
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.stop_filter = StopFilter(params.stop)
        self.output_ids: list[int] = []
        self.prefill_ids = self.prompt_ids
        """What is prefilled before the first new token: the prompt, and the tokens a resumed sequence sent."""
        self.prefilled = 0
        self.slot: int | None = None
        self.finish_reason: FinishReason | None = None
        self.error: Exception | None = None
        """What ended a FAILED sequence."""
        self.cancel_requested = False
        self.yields = False
        """Batch work: it waits behind every waiting sequence that does not (set by `Engine.add`)."""

    @property
    def length(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def max_new_tokens(self) -> int:
        return self.params.max_tokens

    @property
    def steps_left(self) -> int:
        """Decode steps it has left at most (it may stop sooner, at EOS or a stop sequence)."""
        return max(0, self.params.max_tokens - len(self.output_ids))

    @property
    def reserved_tokens(self) -> int:
        """The most KV positions this sequence can ever need."""
        return len(self.prompt_ids) + self.params.max_tokens

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def fail(self, error: Exception) -> None:
        """End the sequence because `error` struck its own work (prefill, sampling, detokenizing, stops)."""
        self.finish_reason, self.error = FinishReason.FAILED, error

    @property
    def output_text(self) -> str:
        """Text emitted so far; after the end, the whole answer (without any stop sequence)."""
        return self.stop_filter.text[: self.stop_filter.emitted]


@dataclass(frozen=True, slots=True)
class Update:
    """What one engine step produced for one sequence (or group: its end only): a token and its text delta,
    and/or the end."""

    sequence: Sequence  # or a workers.engine.groups.RowGroup
    token: int | None
    text: str = ""
    finished: bool = False
    index: int = -1  # position of `token` in the sequence's output
