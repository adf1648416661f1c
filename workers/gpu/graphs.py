"""The GPU decoder's decode step at static shapes, captured as one CUDA graph per bucket.

A decode step of a small model is hundreds of kernel launches, each longer to launch than to run; a CUDA
graph replays them all in one launch. A graph fixes its shapes, so a step runs at the smallest bucket that
holds it: the batch padded up to a power of two (up to MAX_BATCH_SIZE), attention over a power of two of
positions (from `SMALLEST_LENGTH` up to MAX_SEQ_LEN) of the paged cache. Padding rows write their keys to
the cache's trash block and their logits are dropped. Every bucket is captured at start-up, largest first
into one memory pool, while the worker is `starting`. Without CUDA (tests) the same padded step runs eagerly,
so the bucketing and padding are what the tests check; where capture fails the decoder decodes eagerly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from workers.engine.llama import LlamaModel
from workers.gpu.paged_cache import PagedKVCache

log = logging.getLogger(__name__)

SMALLEST_LENGTH = 128
"""The shortest attention bucket: below it, a step's attention costs next to nothing anyway."""

WARMUP_RUNS = 2
"""Eager runs of a bucket before its capture, so cuBLAS and the allocator have made their workspaces."""


def buckets(limit: int, smallest: int = 1) -> list[int]:
    """Powers of two from `smallest` below `limit`, then `limit` itself."""
    sizes, size = [], smallest
    while size < limit:
        sizes.append(size)
        size *= 2
    return [*sizes, limit]


def bucket_for(size: int, sizes: list[int]) -> int:
    """The smallest bucket that holds `size`."""
    for bucket in sizes:
        if bucket >= size:
            return bucket
    raise ValueError(f"{size} exceeds the largest bucket, {sizes[-1]}")


@dataclass(slots=True)
class Bucket:
    """One shape's static inputs (`[2, batch]`: tokens, then positions), its output, and its graph if captured."""

    batch: int
    length: int
    inputs: torch.Tensor
    output: torch.Tensor | None = None
    graph: torch.cuda.CUDAGraph | None = None


class StaticDecode:
    """Runs decode steps of `model` over `cache` at bucketed shapes; `capture()` turns each bucket into a graph."""

    def __init__(self, model: LlamaModel, cache: PagedKVCache, max_batch: int, max_len: int):
        self.model, self.cache = model, cache
        self.batch_sizes = buckets(max_batch)
        self.lengths = buckets(max_len, min(SMALLEST_LENGTH, max_len))
        device = cache.table.device
        self.buckets = {(b, n): Bucket(b, n, self._padding(b, device)) for b in self.batch_sizes for n in self.lengths}

    def _padding(self, batch: int, device) -> torch.Tensor:
        """Inputs of padding rows only: token 0 at the trash position, which writes nothing anyone reads."""
        inputs = torch.zeros((2, batch), dtype=torch.long, device=device)
        inputs[1] = self.cache.trash_position
        return inputs

    @property
    def captured(self) -> int:
        """Buckets replayed from a CUDA graph."""
        return sum(bucket.graph is not None for bucket in self.buckets.values())

    def _forward(self, bucket: Bucket) -> torch.Tensor:
        tokens, positions = bucket.inputs[0, :, None], bucket.inputs[1, :, None]  # [batch, 1] each
        return self.model.static_decode(tokens, positions, self.cache, bucket.length)

    def capture(self) -> None:
        """Capture every bucket's step as a CUDA graph, largest first, sharing one memory pool."""
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        for bucket in sorted(self.buckets.values(), key=lambda b: (-b.batch, -b.length)):
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_RUNS):
                    self._forward(bucket)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                bucket.output = self._forward(bucket)
            bucket.graph = graph
        torch.cuda.synchronize()

    def run(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """Logits `[B, vocab]` for `tokens[b]` at `positions[b]` of slots 0..B-1, through the bucket that holds them."""
        batch = len(tokens)
        bucket = self.buckets[(bucket_for(batch, self.batch_sizes), bucket_for(max(positions) + 1, self.lengths))]
        self.cache.reserve(bucket.length, slice(0, batch), [position + 1 for position in positions])
        padding = bucket.batch - batch
        rows = torch.tensor([tokens + [0] * padding, positions + [self.cache.trash_position] * padding])
        bucket.inputs.copy_(rows, non_blocking=True)
        if bucket.graph is not None:
            bucket.graph.replay()
        else:
            bucket.output = self._forward(bucket)
        return bucket.output[:batch].clone()  # the next replay overwrites the graph's output
