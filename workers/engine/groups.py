"""Jobs that hold several rows of the running batch: a beam search (a row per beam), candidate scoring (a row per
candidate longer than a token).

To the engine's admission and prefill a group is one prompt, as a sequence is: it waits (behind interactive
sequences, as it needs several free rows at once), is admitted when `width` rows are free, and its prompt is
prefilled once, chunk by chunk, into its first slot. Then the prompt's last logits `start` it:

- a group that decodes (beam search) forks its rows from the prompt's slot and joins the running batch: every
  decode step feeds its rows with the other sequences, through the same (compiled) decode step, and hands their
  logits to `advance`, which says which row each row continues (`parents`); rows chosen once keep their slot,
  and each further child takes the slot of a row nobody chose, with a copy of its parent's cache.
- a group that is fed (scoring) copies the prompt into its other slots and stays in the prefill position, where
  its rows' tokens are fed a prefill chunk per step (`next_feed`, `take_fed`) until it has what it needs.

The groups themselves (`workers/features/`) only turn logits into decisions; `GroupSteps`, a part of the engine,
runs them on the batch. A failure in a group's own work fails that group alone, as a sequence's does.
"""

from __future__ import annotations

import torch

from workers.engine.sequence import FinishReason, Update


class GroupRow:
    """One row of the running batch that belongs to a group: its slot and its tokens (the last is its next input)."""

    __slots__ = ("group", "slot", "output_ids")

    def __init__(self, group: RowGroup, slot: int, output_ids: list[int]):
        self.group, self.slot, self.output_ids = group, slot, output_ids

    @property
    def length(self) -> int:
        """Prompt plus the row's tokens, as a sequence's: its cache holds all but the last."""
        return len(self.group.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.group.finished


class RowGroup:
    """A job of `width` batch rows; subclasses say what its rows do with their logits."""

    decodes = True
    """Whether its rows join the running batch's decode steps (else it is fed in the prefill position)."""

    def __init__(self, group_id: str, prompt_ids: list[int], width: int, max_new_tokens: int):
        if not prompt_ids:
            raise ValueError("a group needs at least one prompt token")
        self.id = group_id
        self.prompt_ids = self.prefill_ids = list(prompt_ids)
        self.width, self.max_new_tokens = width, max_new_tokens
        self.prefilled = 0
        self.slot: int | None = None  # its first slot
        self.rows: list[GroupRow] = []  # once it decodes
        self.finish_reason: FinishReason | None = None
        self.error: Exception | None = None
        self.cancel_requested = False
        self.yields = True

    @property
    def steps_left(self) -> int:
        """Decode steps its rows have left at most."""
        return max(0, self.max_new_tokens - max((len(row.output_ids) for row in self.rows), default=0))

    @property
    def reserved_tokens(self) -> int:
        """The most KV positions its rows can ever need."""
        return self.width * (len(self.prompt_ids) + self.max_new_tokens)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def fail(self, error: Exception) -> None:
        """End the group because `error` struck its own work."""
        self.finish_reason, self.error = FinishReason.FAILED, error

    def prefill_rows(self) -> tuple[int, int]:
        """Rows with cache in the prefill position, from its first slot, and the positions each holds."""
        return 1, self.prefilled

    def start(self, logits: torch.Tensor) -> list[int] | None:
        """The prompt is in, with the next token's logits `[1, vocab]`. A decoding group returns the parent of each
        of its rows (all 0: the prompt's row), or None when it has already finished; a fed group returns None."""
        raise NotImplementedError

    def advance(self, logits: torch.Tensor) -> list[int] | None:
        """After a decode step, its rows' logits `[rows, vocab]`: which row each row continues, or None at its end."""
        raise NotImplementedError

    def row_tokens(self) -> list[list[int]]:
        """Each row's tokens after `start` or `advance` (the last one is fed next)."""
        raise NotImplementedError

    def next_feed(self, budget: int) -> tuple[list[list[int]], int]:
        """Groups that are fed: equally long rows of tokens for its rows (about `budget` in all), and their position."""
        raise NotImplementedError

    def take_fed(self, logits: torch.Tensor) -> None:
        """The logits `[rows, tokens, vocab]` of what `next_feed` gave."""
        raise NotImplementedError


def fork(group: RowGroup, parents: list[int], running: list, decoder) -> None:
    """Make the group's row i continue its row `parents[i]` and take its new tokens.

    A row chosen once keeps its slot (no copy); each further child of a row takes the slot of a row nobody chose
    (or a new one at the end of `running`) and a copy of its parent's cache. Parents are never written to, so the
    copies can go one by one.
    """
    old, chosen = group.rows, set(parents)
    spare = [row for index, row in enumerate(old) if index not in chosen]
    rows: list[GroupRow | None] = []
    taken: set[int] = set()
    for parent in parents:
        rows.append(None if parent in taken else old[parent])
        taken.add(parent)
    for index, parent in enumerate(parents):
        if rows[index] is not None:
            continue
        if spare:
            row = spare.pop()
        else:  # the group grows (its first choice: every row forks from the prompt's)
            row = GroupRow(group, len(running), [])
            running.append(row)
        decoder.copy_slot(old[parent].slot, row.slot, old[parent].length)
        rows[index] = row
    for row, tokens in zip(rows, group.row_tokens()):
        row.output_ids = tokens
    group.rows = rows


class GroupSteps:
    """The engine's part for groups: starting one on its prompt, its rows after a decode step, feeding one.

    A part of `Engine` (a base class of it, kept here with the groups): it works on the engine's `running` rows,
    `prefilling` job, `decoder` and `prefill_chunk`, and uses its `_sample` and `_fail`.
    """

    def _start_group(self, group: RowGroup, logits: torch.Tensor) -> list[Update]:
        """The group's prompt is in (it was prefilled alone, in the slot just after the running batch)."""
        if group.decodes:
            self.prefilling = None
            group.rows = [GroupRow(group, group.slot, [])]
            self.running.append(group.rows[0])
            return self._step_group(group, logits[None], group.start)
        try:
            group.start(logits[None])
            for offset in range(1, group.prefill_rows()[0]):
                self.decoder.copy_slot(group.slot, group.slot + offset, group.prefilled)
        except Exception as exc:  # noqa: BLE001 (its own work: it alone fails)
            group.fail(exc)
        return self._end_feeding(group)

    def _step_group(self, group: RowGroup, logits: torch.Tensor, choose) -> list[Update]:
        """Let a decoding group `choose` from its rows' logits and fork its rows accordingly."""
        try:
            parents = choose(logits)
            if parents is not None:
                fork(group, parents, self.running, self.decoder)
        except Exception as exc:  # noqa: BLE001 (its own work: it alone fails; its rows leave the batch)
            return [self._fail(group, exc)]
        return [Update(group, None, "", True)] if group.finished else []

    def _advance(self, logits: torch.Tensor, rows: list) -> list[Update]:
        """After a decode step: sequences sample their next tokens together, each group chooses from its rows'."""
        groups = list(dict.fromkeys(row.group for row in rows if isinstance(row, GroupRow)))
        if not groups:
            return self._sample(logits, rows)
        plain = [index for index, row in enumerate(rows) if not isinstance(row, GroupRow)]
        updates = self._sample(logits[plain], [rows[index] for index in plain]) if plain else []
        for group in groups:  # `rows` is the running batch: a row's index is its slot
            updates.extend(self._step_group(group, logits[[row.slot for row in group.rows]], group.advance))
        return updates

    def _feed_group(self, group: RowGroup) -> list[Update]:
        """One prefill chunk of a fed group's rows (after its prompt)."""
        try:
            tokens, start = group.next_feed(self.prefill_chunk)
            group.take_fed(self.decoder.prefill_rows(group.slot, tokens, start))
        except Exception as exc:  # noqa: BLE001 (its own work: it alone fails)
            group.fail(exc)
        return self._end_feeding(group)

    def _end_feeding(self, group: RowGroup) -> list[Update]:
        """A fed group that has finished leaves the prefill position."""
        if not group.finished:
            return []
        self.prefilling = None
        return [Update(group, None, "", True)]
