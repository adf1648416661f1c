"""The GPU decoder's KV cache: one pool of `MAX_TOKENS_IN_FLIGHT` positions in blocks, lent to slots on demand.

The slot layout (`workers/engine/kv_cache.py`) holds `slots x MAX_SEQ_LEN` positions whatever the work; here
memory is what the engine may reserve (prompt + max_tokens of the sequences holding a slot), so the settings
bound it. Each layer's keys are one tensor `[positions, kv_heads, head_dim]`; a slot owns a list of blocks
(`BLOCK` positions each), and a device table maps (slot, position) to a pool position. Attention reads a
gather of the rows' positions, computed on the device from the table, so a CUDA graph can replay it.

Slots follow the engine's layout (`workers/engine/decoder.py`): a prefill of slot s leaves the slots above it
free, and a decode of slots 0..B-1 those above B (slot B may hold the sequence being prefilled); the decoder
returns their blocks to the pool (`release_from`) before it lends any. Block 0 is never lent: padding writes
land there.
"""

from __future__ import annotations

import math

import torch

from workers.engine.kv_cache import ordinary_tensors

BLOCK = 16
"""Positions per block: a slot wastes fewer than this at its end."""

TRASH = 0
"""The block that padding writes land in and unlent table entries point to; never read as anyone's tokens."""


class PagedKVCache:
    """Keys and values of `max_slots` sequences within `max_tokens` positions in all (plus a block per slot)."""

    def __init__(self, *, num_layers: int, max_slots: int, num_kv_heads: int, head_dim: int, max_len: int,
                 max_tokens: int, dtype: torch.dtype, device: torch.device | str):
        self.max_slots, self.max_len, self.dtype = max_slots, max_len, dtype
        # Each slot may leave its last block part-empty, hence one block per slot on top of the budget.
        self.num_blocks = 1 + math.ceil(max_tokens / BLOCK) + max_slots
        self.blocks_per_slot = math.ceil(max_len / BLOCK)
        shape = (self.num_blocks * BLOCK, num_kv_heads, head_dim)
        with ordinary_tensors():
            self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
            self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
            # One extra column, always TRASH: where padding rows of a captured step write (see `trash_position`).
            self.table = torch.full((max_slots, self.blocks_per_slot + 1), TRASH, dtype=torch.long, device=device)
        self.owned: list[list[int]] = [[] for _ in range(max_slots)]
        self.free = list(range(self.num_blocks - 1, TRASH, -1))  # popped from the end: low blocks first
        self._memo: dict = {}

    @property
    def trash_position(self) -> int:
        """A position every slot maps to the trash block: padding rows write their keys there."""
        return self.blocks_per_slot * BLOCK

    @property
    def nbytes(self) -> int:
        """Bytes of keys and values."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    @property
    def blocks_in_use(self) -> int:
        """Blocks lent to slots."""
        return self.num_blocks - 1 - len(self.free)

    @ordinary_tensors()
    def reserve(self, length: int, slots: slice | None = None, ends: list[int] | None = None) -> None:
        """Before a forward pass: lend each slot of `slots` blocks for its positions below `ends[i]` (a slot
        given fewer than it holds, a new sequence's, returns the rest). Without `slots`, only starts a new pass."""
        if length > self.max_len:
            raise ValueError(f"sequence of {length} tokens exceeds the cache's {self.max_len}")
        self._memo.clear()
        if slots is None:
            return
        changed = []
        for slot, end in zip(range(slots.start, slots.stop), ends):
            changed += self._resize(slot, math.ceil(end / BLOCK))
        self._write_table(changed)

    def release_from(self, first: int) -> None:
        """Return the blocks of slots `first..` to the pool (their sequences have left)."""
        changed = []
        for slot in range(first, self.max_slots):
            changed += self._resize(slot, 0)
        self._write_table(changed)

    def _resize(self, slot: int, blocks: int) -> list[tuple[int, int, int]]:
        """Give `slot` exactly `blocks` blocks, keeping its first ones; the table entries that change."""
        owned = self.owned[slot]
        changed = []
        while len(owned) > blocks:
            self.free.append(owned.pop())
            changed.append((slot, len(owned), TRASH))
        while len(owned) < blocks:
            if not self.free:
                raise RuntimeError(f"the KV cache's {self.num_blocks - 1} blocks are all lent: the engine admitted "
                                   "more than its MAX_TOKENS_IN_FLIGHT (a bug)")
            owned.append(self.free.pop())
            changed.append((slot, len(owned) - 1, owned[-1]))
        return changed

    def _write_table(self, changed: list[tuple[int, int, int]]) -> None:
        """Copy changed table entries to the device in one go (the last change of an entry wins)."""
        if changed:
            latest = {(slot, column): block for slot, column, block in changed}  # no duplicate index on the device
            rows = [(slot, column, block) for (slot, column), block in latest.items()]
            # Without waiting for the device's queued work (a blocking copy to a GPU synchronises).
            slots, columns, blocks = torch.tensor(rows, dtype=torch.long).to(self.table.device, non_blocking=True).T
            self.table[slots, columns] = blocks
            self._memo.clear()

    def index(self, slots: slice, positions: torch.Tensor) -> torch.Tensor:
        """Pool positions `[B, T]` of `positions` `[B, T]` of the slots, computed on the device."""
        table = self.table[slots]  # [B, blocks_per_slot + 1]
        return table.gather(1, positions // BLOCK) * BLOCK + positions % BLOCK

    def write(self, layer: int, slots: slice, rows: torch.Tensor, positions: torch.Tensor,
              key: torch.Tensor, value: torch.Tensor) -> None:
        """Store `key`/`value` `[B, T, kv_heads, head_dim]` at `positions` `[B, T]` of the slots (rows in order)."""
        where = self._memo.get(("write", id(positions)))
        if where is None:  # once per pass: every layer writes the same positions
            where = self._memo[("write", id(positions))] = self.index(slots, positions)
        self.keys[layer][where] = key.to(self.dtype)
        self.values[layer][where] = value.to(self.dtype)

    def read(self, layer: int, slots: slice, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Gathered `[B, kv_heads, length, head_dim]` of the slots' first `length` positions."""
        key = ("read", slots.start, slots.stop, length)
        where = self._memo.get(key)
        if where is None:
            batch = slots.stop - slots.start
            device = self.table.device
            where = self._memo[key] = self.index(slots, torch.arange(length, device=device).expand(batch, length))
        return self.keys[layer][where].transpose(1, 2), self.values[layer][where].transpose(1, 2)

    @ordinary_tensors()
    def move_slot(self, source: int, target: int, length: int) -> None:
        """Hand `source`'s blocks to `target` (compaction): no data moves; `source` is left empty."""
        if source == target:
            return
        changed = self._resize(target, 0)
        self.owned[target], self.owned[source] = self.owned[source], []
        changed += [(target, column, block) for column, block in enumerate(self.owned[target])]
        changed += [(source, column, TRASH) for column in range(len(self.owned[target]))]
        self._write_table(changed)

    @ordinary_tensors()
    def copy_slot(self, source: int, target: int, length: int) -> None:
        """Copy the first `length` positions of one slot into another, which keeps its own blocks."""
        if source == target or length == 0:
            return
        self._write_table(self._resize(target, math.ceil(length / BLOCK)))
        positions = torch.arange(length, device=self.table.device)[None]
        source_index = self.index(slice(source, source + 1), positions)[0]
        target_index = self.index(slice(target, target + 1), positions)[0]
        for tensors in (self.keys, self.values):
            for tensor in tensors:
                tensor[target_index] = tensor[source_index]
