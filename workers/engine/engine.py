"""The continuous-batching loop: admit, prefill a chunk, decode every running sequence, retire.

A step is three parts, as in nano-vllm: schedule (admit waiting sequences into free slots), run (one
prefill chunk for the sequence being admitted, then one decode step for all running ones) and postprocess
(sample, detokenise, check stops, retire finished sequences and compact the cache). Running sequences
sit in slots 0..B-1; the sequence being prefilled sits in slot B. A beam search or scoring job is a group of
several rows (`groups.py`): admitted and prefilled as one prompt, then a row per beam among the running ones.

Isolation: work that belongs to one sequence (its prefill, sampling its token, detokenizing, its stop
checks; a group's choices) ends only that sequence when it raises: it finishes as FAILED with the exception,
and the others go on. A group prefill that raises is retried one prompt at a time, a batched sampling one row
at a time, so only the culprit fails. The decode step's one forward pass over every running row cannot be
pinned on one of them: an exception there leaves `step()` (the worker then fails the running jobs). Nor can a
device failure (a CUDA error, workers/engine/device_failure.py), wherever it strikes: it leaves `step()` too.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import torch
from tokenizers import Tokenizer

from shared.limits import check_context
from workers.engine.decoder import Decoder
from workers.engine.device_failure import reraise_device_failure
from workers.engine.groups import GroupRow, GroupSteps, RowGroup
from workers.engine.sampler import sample
from workers.engine.sequence import FinishReason, Sequence, Update

EngineJob = Sequence | RowGroup
"""What the engine admits, prefills and ends: a sequence (one row of the batch) or a group of rows."""


class Engine(GroupSteps):
    """Runs many sequences at once on one decoder."""

    def __init__(self, decoder: Decoder, tokenizer: Tokenizer, eos_token_ids: Iterable[int], *,
                 prefill_chunk: int = 256, max_tokens_in_flight: int | None = None,
                 max_yielding_rows: int | None = None):
        """`max_yielding_rows`: rows that work which yields (batch prompts, groups) may hold together at most,
        so the rest stay free for interactive requests (default: all)."""
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.prefill_chunk = prefill_chunk
        limit = max_tokens_in_flight or decoder.max_batch_size * decoder.max_seq_len
        # A cache sized by memory (the GPU decoder's) may hold less than asked: it bounds what is reserved.
        self.max_tokens_in_flight = limit if decoder.token_capacity is None else min(limit, decoder.token_capacity)
        self.max_yielding_rows = min(max_yielding_rows or decoder.max_batch_size, decoder.max_batch_size)
        self.waiting: deque[EngineJob] = deque()
        self.running: list[Sequence | GroupRow] = []  # the rows of the batch: row b is slot b
        self.prefilling: EngineJob | None = None

    # -- admission -----------------------------------------------------------------------------------

    def check_fits(self, prompt_tokens: int, max_tokens: int, rows: int = 1) -> None:
        """Refuse a request that can never run here (ContextLengthError: context; ValueError: rows or KV budget)."""
        check_context(prompt_tokens, max_tokens, self.decoder.max_seq_len)
        if rows > 1 and rows > self.max_yielding_rows:  # a group always yields
            raise ValueError(f"request needs {rows} rows of the batch, more than the {self.max_yielding_rows} this "
                             "worker gives beam searches, scoring and batch prompts")
        if rows * (prompt_tokens + max_tokens) > self.max_tokens_in_flight:
            raise ValueError(f"request needs {rows * (prompt_tokens + max_tokens)} KV positions, more than the "
                             f"{self.max_tokens_in_flight} this worker holds")

    @property
    def active(self) -> list[EngineJob]:
        """Jobs holding rows: running ones (a group once), then the one being prefilled."""
        jobs = dict.fromkeys(row.group if isinstance(row, GroupRow) else row for row in self.running)
        return [*jobs, *([self.prefilling] if self.prefilling else [])]

    @staticmethod
    def _rows(jobs: Iterable[EngineJob], *, yielding: bool = False) -> int:
        """Rows of the batch that `jobs` hold or will hold (only those that yield, if `yielding`)."""
        return sum(job.width for job in jobs if job.yields or not yielding)

    def tokens_in_flight(self) -> int:
        """KV positions reserved by the sequences holding a slot."""
        return sum(s.reserved_tokens for s in self.active)

    def wants_more(self, *, urgent: bool = False) -> bool:
        """Whether to take one more queued request: it would get a slot, and the next step's prefill.

        Requests that arrive together are then prefilled together, one padded pass for the group rather
        than one step each; taking no more than the next prefill uses leaves the rest of the queue to
        other workers. Nothing is taken while a waiting request is held back by the KV budget. An `urgent`
        request (one that does not yield) is added ahead of the yielding ones, so only those it would wait
        behind count: a batch prompt waiting for its prefill never keeps an interactive request in Redis.
        """
        ahead = [s for s in self.waiting if not (urgent and s.yields)]
        if self._rows([*self.active, *ahead]) >= self.decoder.max_batch_size:
            return False
        if not urgent and self._rows([*self.active, *ahead], yielding=True) >= self.max_yielding_rows:
            return False
        if not ahead:
            return True
        return (self.prefilling is None and self._can_admit(ahead[0], [])
                and sum(len(s.prefill_ids) for s in ahead) < self.prefill_chunk)

    def _can_admit(self, sequence: EngineJob, joining: list[EngineJob]) -> bool:
        """Whether `sequence` fits beside the running ones and those `joining` in this step: its rows (within
        the share of yielding work if it yields), and its KV positions."""
        holding = [*self.active, *joining, sequence]
        return (self._rows(holding) <= self.decoder.max_batch_size
                and (not sequence.yields or self._rows(holding, yielding=True) <= self.max_yielding_rows)
                and sum(s.reserved_tokens for s in holding) <= self.max_tokens_in_flight)

    def add(self, sequence: EngineJob, resumed_ids: Iterable[int] = (), *, yields: bool = False) -> None:
        """Queue a sequence or group; it is admitted at a following step. One that `yields` (batch work, and
        every group, which waits for several free rows at once) is admitted after every waiting sequence that
        does not, so an interactive request is never queued behind it.

        `resumed_ids` are tokens the sequence's previous worker generated and sent before it died. They are
        replayed as if just sampled (sampler memory, detokenizer, stop filter, stop checks) and prefilled with
        the prompt, so the sequence goes on exactly where its stream stopped.
        """
        self.check_fits(len(sequence.prompt_ids), sequence.max_new_tokens, sequence.width)
        if isinstance(sequence, Sequence):
            for token in resumed_ids:
                self._record(sequence, token)  # raises: the caller refuses the sequence
            sequence.prefill_ids = sequence.prompt_ids + sequence.output_ids
        sequence.yields = yields = yields or isinstance(sequence, RowGroup)
        ahead = len(self.waiting) if yields else next(
            (i for i, waiting in enumerate(self.waiting) if waiting.yields), len(self.waiting))
        self.waiting.insert(ahead, sequence)

    def cancel(self, sequence_id: str) -> bool:
        """Ask a sequence to stop; it ends as cancelled at the next step. Returns whether it was found."""
        for sequence in (*self.active, *self.waiting):
            if sequence.id == sequence_id:
                sequence.cancel_requested = True
                return True
        return False

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.prefilling)

    # -- the step ------------------------------------------------------------------------------------

    def step(self) -> list[Update]:
        """Advance every sequence by at most one token; return what happened to each."""
        updates = self._retire_cancelled()
        if self.prefilling is None:
            group = self._admit()
            if group:
                updates.extend(self._prefill_group(group))
                self._retire_finished()
        if self.prefilling is not None:
            updates.extend(self._prefill_chunk())
            self._retire_finished()
        if self.running:
            updates.extend(self._decode())
            self._retire_finished()
        return updates

    def _admit(self) -> list[Sequence]:
        """Take waiting sequences whose prompts fit this step's prefill budget, to prefill together.

        A prompt longer than the budget is admitted alone and prefilled chunk by chunk over several steps, and
        so is a group's (its rows fork from its prompt's slot, the one after the running batch).
        """
        group: list[Sequence] = []
        budget = self.prefill_chunk
        while self.waiting and self._can_admit(self.waiting[0], group):
            prompt_length = len(self.waiting[0].prefill_ids)
            if prompt_length > self.prefill_chunk or isinstance(self.waiting[0], RowGroup):
                if not group:
                    self.prefilling = self.waiting.popleft()
                    self.prefilling.slot = len(self.running)
                break
            if prompt_length > budget:
                break
            budget -= prompt_length
            group.append(self.waiting.popleft())
        return group

    def _prefill_group(self, group: list[Sequence]) -> list[Update]:
        """Prefill short prompts in one padded pass; they join the running batch at once.

        A pass that raises is tried again one prompt at a time (each pass writes only its own prompts'
        slots), so only a prompt whose own prefill fails ends, as FAILED.
        """
        first = len(self.running)
        try:
            logits = self.decoder.prefill_many(first, [s.prefill_ids for s in group])
        except Exception as exc:  # noqa: BLE001 (whatever it is, it ends one sequence, not the batch)
            reraise_device_failure(exc)
            if len(group) == 1:
                return [self._fail(group[0], exc)]
            return [update for sequence in group for update in self._prefill_group([sequence])]
        for offset, sequence in enumerate(group):
            sequence.slot, sequence.prefilled = first + offset, len(sequence.prefill_ids)
            self.running.append(sequence)
        return self._sample(logits, group)

    def _prefill_chunk(self) -> list[Update]:
        sequence = self.prefilling
        if isinstance(sequence, RowGroup) and sequence.prefilled == len(sequence.prefill_ids):
            return self._feed_group(sequence)  # its prompt is in; its rows are fed now
        chunk = sequence.prefill_ids[sequence.prefilled: sequence.prefilled + self.prefill_chunk]
        try:
            logits = self.decoder.prefill(sequence.slot, chunk, start=sequence.prefilled)
        except Exception as exc:  # noqa: BLE001 (its slot is simply overwritten by the next admission)
            reraise_device_failure(exc)
            self.prefilling = None
            return [self._fail(sequence, exc)]
        sequence.prefilled += len(chunk)
        if sequence.prefilled < len(sequence.prefill_ids):
            return []
        if isinstance(sequence, RowGroup):
            return self._start_group(sequence, logits)
        self.prefilling = None
        self.running.append(sequence)
        return self._sample(logits[None], [sequence])

    def _decode(self) -> list[Update]:
        tokens = [s.output_ids[-1] for s in self.running]
        positions = [s.length - 1 for s in self.running]
        logits = self.decoder.decode(tokens, positions)  # one pass for all: a failure here is the batch's
        return self._advance(logits, list(self.running))

    def _sample(self, logits: torch.Tensor, sequences: list[Sequence]) -> list[Update]:
        """Sample each sequence's next token from its row of `logits` `[B, vocab]` and accept it.

        Sampling is row by row in effect, so when the batched call raises, each row is sampled alone and
        only a sequence whose own sampling raises fails. (Random draws come last in `sample`, so the retry
        repeats none unless a draw itself raised.)
        """
        try:
            tokens = sample(logits, [s.sampling for s in sequences])
        except Exception as exc:  # noqa: BLE001
            reraise_device_failure(exc)
            if len(sequences) == 1:
                return [self._fail(sequences[0], exc)]
            return [update for row, sequence in enumerate(sequences)
                    for update in self._sample(logits[row: row + 1], [sequence])]
        return [self._accept(sequence, token) for sequence, token in zip(sequences, tokens)]

    def _accept(self, sequence: Sequence, token: int) -> Update:
        """Record a sampled token; if the sequence's own bookkeeping raises, it alone ends, as FAILED."""
        try:
            return self._record(sequence, token)
        except Exception as exc:  # noqa: BLE001 (a detokenizer or stop filter bug must not end the batch)
            return self._fail(sequence, exc)

    @staticmethod
    def _fail(sequence: EngineJob, error: Exception) -> Update:
        """End `sequence` as FAILED: the worker reports `error` for its job alone."""
        sequence.fail(error)
        return Update(sequence, None, "", True)

    def _record(self, sequence: Sequence, token: int) -> Update:
        """Record a sampled token: detokenise, look for stops, decide whether the sequence is done."""
        sequence.output_ids.append(token)
        sequence.sampling.observe(token)
        stops = sequence.stop_filter
        if token in self.eos_token_ids:
            sequence.finish_reason = FinishReason.EOS
            text = stops.flush()
        else:
            text = stops.push(sequence.detokenizer.add(token))
            if stops.stopped:
                sequence.finish_reason = FinishReason.STOP
            elif len(sequence.output_ids) >= sequence.params.max_tokens or sequence.length >= self.decoder.max_seq_len:
                sequence.finish_reason = FinishReason.LENGTH
                text += stops.flush()
        return Update(sequence, token, text, sequence.finished, len(sequence.output_ids) - 1)

    # -- retiring ------------------------------------------------------------------------------------

    def _retire_cancelled(self) -> list[Update]:
        """End sequences asked to stop, and those whose resumed tokens already ended them (see `add`)."""
        updates = [Update(s, None, "", True) for s in self.waiting if s.finished]
        for sequence in [s for s in (*self.active, *self.waiting) if s.cancel_requested and not s.finished]:
            sequence.finish_reason = FinishReason.CANCELLED
            updates.append(Update(sequence, None, "", True))
        if self.prefilling is not None and self.prefilling.finished:
            self.prefilling = None  # its slot is simply overwritten by the next admission
        self.waiting = deque(s for s in self.waiting if not s.finished)
        self._retire_finished()
        return updates

    def _retire_finished(self) -> None:
        """Drop finished rows, moving the last running one into each freed slot."""
        slot = 0
        while slot < len(self.running):
            if not self.running[slot].finished:
                slot += 1
                continue
            last = self.running.pop()
            if slot < len(self.running) and not last.finished:  # (a group's rows often end last, together)
                self.decoder.move_slot(len(self.running), slot, last.length - 1)
                last.slot = slot
                self.running[slot] = last
        prefilling = self.prefilling
        if prefilling is not None and prefilling.slot != len(self.running):
            # The job being prefilled lives just after the running ones (a fed group in several slots); keep it there.
            rows, length = prefilling.prefill_rows() if isinstance(prefilling, RowGroup) else (1, prefilling.prefilled)
            for offset in range(rows):  # upwards: a slot is read before any row lands on it
                self.decoder.move_slot(prefilling.slot + offset, len(self.running) + offset, length)
            prefilling.slot = len(self.running)
        held = prefilling.prefill_rows()[0] if isinstance(prefilling, RowGroup) else int(prefilling is not None)
        self.decoder.release_slots(len(self.running) + held)

    # -- convenience ---------------------------------------------------------------------------------

    def run(self, sequences: Iterable[EngineJob]) -> list[EngineJob]:
        """Add sequences (or groups) and step until all of them are finished (tests and benchmarks)."""
        sequences = list(sequences)
        for sequence in sequences:
            self.add(sequence)
        while any(not s.finished for s in sequences):
            self.step()
        return sequences
