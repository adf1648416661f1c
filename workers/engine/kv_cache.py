"""Per-sequence KV caches as slots of one padded tensor per layer.

Layout (chosen by measurement, see BENCHMARKS.md): keys/values are `[slots, kv_heads, capacity, head_dim]`.
Running sequences occupy slots 0..B-1 without gaps, so a decode step reads `[:B, :, :L]` as a view,
never a gather; when a sequence leaves, the last one moves into its slot. Capacity grows on demand.
"""

from __future__ import annotations

import torch


def ordinary_tensors() -> torch.inference_mode:
    """No autograd, and no inference tensors even when called under inference mode.

    The cache is written under inference mode (prefill) and outside it (the compiled decode step, which
    torch.compile runs under no_grad); an inference tensor would refuse the second kind of write.
    """
    return torch.inference_mode(False)


class KVCache:
    """Keys and values of every layer for up to `max_slots` sequences of up to `max_len` tokens."""

    def __init__(self, *, num_layers: int, max_slots: int, num_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str, initial_len: int = 256, static: bool = False):
        self.max_slots = max_slots
        self.max_len = max_len
        self.dtype = dtype
        capacity = max_len if static else min(initial_len, max_len)
        shape = (max_slots, num_kv_heads, capacity, head_dim)
        with ordinary_tensors():
            self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
            self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @property
    def capacity(self) -> int:
        """Tokens each slot can hold before the cache must grow."""
        return self.keys[0].shape[2]

    @ordinary_tensors()
    def reserve(self, length: int, slots: slice | None = None, ends: list[int] | None = None) -> None:
        """Make room for `length` tokens per slot, doubling capacity (the copy is rare).

        `slots` and `ends` (each written slot's last position + 1) matter to a cache that holds each slot's
        tokens apart (workers/gpu/paged_cache.py); this one grows every slot alike."""
        if length > self.max_len:
            raise ValueError(f"sequence of {length} tokens exceeds the cache's {self.max_len}")
        if length <= self.capacity:
            return
        new_capacity = min(self.max_len, max(length, 2 * self.capacity))
        for tensors in (self.keys, self.values):
            for index, old in enumerate(tensors):
                grown = old.new_zeros((*old.shape[:2], new_capacity, old.shape[3]))
                grown[:, :, : old.shape[2]] = old
                tensors[index] = grown

    def write(self, layer: int, slots: slice, rows: torch.Tensor, positions: torch.Tensor,
              key: torch.Tensor, value: torch.Tensor) -> None:
        """Store `key`/`value` `[B, T, kv_heads, head_dim]` at `positions` `[B, T]` of rows `[B, 1]` of the slots."""
        self.keys[layer][slots][rows, :, positions] = key.to(self.dtype)
        self.values[layer][slots][rows, :, positions] = value.to(self.dtype)

    def read(self, layer: int, slots: slice, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views `[B, kv_heads, length, head_dim]` of the slots' first `length` positions."""
        return self.keys[layer][slots, :, :length], self.values[layer][slots, :, :length]

    @ordinary_tensors()
    def copy_slot(self, source: int, target: int, length: int) -> None:
        """Copy the first `length` positions of one slot into another (compaction, beam forks)."""
        if source == target or length == 0:
            return
        for tensors in (self.keys, self.values):
            for tensor in tensors:
                tensor[target, :, :length] = tensor[source, :, :length]
