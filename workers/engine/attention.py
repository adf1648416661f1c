"""Attention over the slot KV cache: one function for eager forward passes, one for the compiled decode step.

`chunk_attention` serves prefill chunks and eager decode steps (any number of new tokens per row) with
SDPA, one call per block: the whole batch under one causal mask, or, where results must not depend on the
batch nor on how a prompt is cut into chunks (the INT8 decoder), each row alone, its queries in blocks of
QUERY_BLOCK positions over exactly the keys they see. `decode_attention` serves the compiled decode step (one
new token per row) as plain reductions the compiler fuses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

QUERY_BLOCK = 16
"""With exact rows, a row's queries attend in blocks of this many positions, aligned on multiples of it (the
last block of a pass may be shorter). SDPA's result for a query depends on how many queries share its call:
prefilled whole or in two chunks, a 300-token prompt's logits differed by up to 0.8, and the argmax with them,
since INT8 activations amplify the kernel's rounding. At fixed positions, every way of cutting a prompt at
multiples of QUERY_BLOCK (chunked prefill, a prefix whose KV is kept) computes the same blocks, bit for bit."""


@dataclass(frozen=True, slots=True)
class Block:
    """Rows that attend in one SDPA call: `queries` queries from the `first` over their first `keys` keys."""

    rows: slice
    queries: int
    keys: int
    mask: torch.Tensor | None  # [rows, 1, queries, keys] additive, in the queries' dtype; None: all visible
    first: int = 0


def causal_mask(starts: list[int], steps: int, device, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """Additive mask `[B, 1, steps, max(starts) + steps]`: row b's query t sees the keys up to `starts[b] + t`.

    In the queries' `dtype`: SDPA's fused GPU kernels refuse a mask of another dtype (0 and -inf are exact
    in every float type). None when every query sees every key: one query per row, all at the same position.
    """
    length = max(starts) + steps
    if steps == 1 and min(starts) == length - 1:
        return None
    positions = torch.tensor(starts, device=device)[:, None] + torch.arange(steps, device=device)  # [B, T]
    visible = torch.arange(length, device=device)[None, None, :] <= positions[:, :, None]  # [B, T, length]
    return torch.zeros(visible.shape, device=device, dtype=dtype).masked_fill_(~visible, float("-inf"))[:, None]


def attention_blocks(starts: list[int], lengths: list[int], steps: int, exact_rows: bool, device,
                     dtype: torch.dtype = torch.float32) -> list[Block]:
    """How the rows of a forward pass attend: all together under one mask, or (`exact_rows`) each alone, in
    blocks of queries at fixed positions (QUERY_BLOCK).

    Row b holds `lengths[b]` real tokens from position `starts[b]`. Alone, a row attends over exactly its
    own keys: padding them to the batch's longest changes the kernel's summation order, and INT8
    activations amplify such differences into other tokens.
    """
    if not exact_rows:
        return [Block(slice(0, len(starts)), steps, max(starts) + steps, causal_mask(starts, steps, device, dtype))]
    blocks = []
    for row, (start, count) in enumerate(zip(starts, lengths)):
        first = 0
        while first < count:
            position = start + first
            end = min(count, (position // QUERY_BLOCK + 1) * QUERY_BLOCK - start)  # to the next multiple
            blocks.append(Block(slice(row, row + 1), end - first, start + end,
                                causal_mask([position], end - first, device, dtype), first))
            first = end
    return blocks


def chunk_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, blocks: list[Block]) -> torch.Tensor:
    """Attention of each row's new queries over its cached keys, one SDPA call per block."""
    # q: [B, heads, T, head_dim]; keys/values: [B, kv_heads, length, head_dim]
    outs = [F.scaled_dot_product_attention(q[block.rows, :, block.first: block.first + block.queries],
                                           keys[block.rows, :, : block.keys], values[block.rows, :, : block.keys],
                                           attn_mask=block.mask, enable_gqa=True)
            for block in blocks]
    if all(block.first == 0 and out.shape[2] == q.shape[2] for block, out in zip(blocks, outs)):
        return outs[0] if len(outs) == 1 else torch.cat(outs)
    out = q.new_zeros(q.shape)  # padded prefill: rows shorter than T leave zeros (their outputs are unused)
    for block, rows in zip(blocks, outs):
        out[block.rows, :, block.first: block.first + block.queries] = rows
    return out


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """One query per row over the keys `visible[b]` marks, written as plain reductions for the compiler.

    Inductor turns this into loops that reduce every row the same way, whatever the batch size and the
    padded length (masked keys add exact zeros): tested bit-identical to the row decoded alone, so the
    compiled decode step keeps the INT8 decoder's batch invariance without a Python loop over rows.
    """
    # q: [B, heads, 1, head_dim]; keys/values: [B, kv_heads, length, head_dim]; visible: [B, length]
    batch, heads, _, head_dim = q.shape
    kv_heads = keys.shape[1]
    q = q.reshape(batch, kv_heads, heads // kv_heads, 1, head_dim)
    scores = (q * keys[:, :, None]).sum(-1) * head_dim**-0.5  # [B, kv_heads, group, length]
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    out = (scores.softmax(-1)[..., None] * values[:, :, None]).sum(-2)  # [B, kv_heads, group, head_dim]
    return out.reshape(batch, heads, 1, head_dim)
