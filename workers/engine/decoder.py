"""The decoder interface both pools implement: load weights once, then prefill and decode batches.

A decoder owns a model and a KV cache of `max_batch_size` slots, the only cache: every job (a generation,
each beam of a beam search, each scored candidate) is rows of it. The scheduler keeps running rows in slots
0..B-1: `decode` advances all of them by one token in one forward pass, `prefill` feeds a chunk of one
sequence's prompt into its slot, and `move_slot` compacts the cache when a row leaves (and forks a beam).
"""

from __future__ import annotations

import functools
import logging
import types

import torch

from workers.engine.kv_cache import KVCache
from workers.engine.llama import LlamaConfig, LlamaModel, decode_layer

log = logging.getLogger(__name__)


@functools.cache
def layer_function(variant: str):
    """`decode_layer` under a code object of its own for each decoder variant.

    Dynamo keeps compiled graphs per code object, and the compiled step skips guards on modules (that is
    what lets all layers share one graph), so it would not notice a module attribute that differs between
    two decoders of the same shapes, such as the INT8 layers' two-pass form: each variant gets its own.
    """
    code = decode_layer.__code__.replace(co_name=f"decode_layer_{variant}")
    return types.FunctionType(code, decode_layer.__globals__, code.co_name, decode_layer.__defaults__)


class Decoder:
    """Batched inference over a slot KV cache. Subclasses load weights and choose device and dtype."""

    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    cache_dtype: torch.dtype | None = None
    """The KV cache's dtype when it differs from `dtype`."""
    static_cache = False

    @property
    def variant(self) -> str:
        """What, besides tensor shapes, changes the compiled decode step; decoders of one variant share it."""
        return type(self).__name__

    def __init__(self, *, max_batch_size: int = 32, max_seq_len: int = 2048, threads: int = 0,
                 compile_decode: bool = False):
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        if threads > 0:
            torch.set_num_threads(threads)
        self.compile_decode = compile_decode
        self.model: LlamaModel | None = None
        self.cache: KVCache | None = None
        self._compiled_layer = None

    @property
    def decode_is_compiled(self) -> bool:
        """Whether decode steps run the compiled layer (compile_decode asked for it and it compiled)."""
        return self._compiled_layer is not None

    @property
    def config(self) -> LlamaConfig:
        """The loaded model's shape."""
        assert self.model is not None, "load weights first"
        return self.model.config

    def _attach(self, model: LlamaModel) -> None:
        self.model = model
        config = model.config
        self.max_seq_len = min(self.max_seq_len, config.max_position_embeddings)
        self.cache = self.batch_cache()
        if self.compile_decode:
            self._compile_decode_layer()

    def batch_cache(self) -> KVCache:
        """The running batch's cache: `max_batch_size` slots (beam forks and scoring rows live in them too)."""
        config = self.config
        return KVCache(
            num_layers=config.num_layers, max_slots=self.max_batch_size, num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim, max_len=self.max_seq_len, dtype=self.cache_dtype or self.dtype,
            device=self.device, static=self.static_cache)

    @property
    def token_capacity(self) -> int | None:
        """KV positions the running batch's cache holds, where that bounds what the engine may reserve; None for
        the slot layout, which holds every slot at full length."""
        return None

    def _compile_decode_layer(self) -> None:
        """Compile the decode step's layer now, for one row and for several, so no request waits for it.

        A small decode step is hundreds of tiny torch ops; compiled, each layer's fuse into a few kernels
        around the matmuls. One graph serves all layers (batch 1 gets its own), so compiling takes seconds
        rather than minutes, and Inductor caches it on disk. Without a working compiler toolchain the
        decoder logs why and stays eager.
        """
        # Floats (norm epsilon, scales) stay constants: left symbolic, they force a second full trace.
        # Skipping guards on modules is what lets the layers share a graph; they never change after loading.
        torch._dynamo.config.specialize_float = True
        # Sizes that happen to be equal while compiling (batch 2, length 2, 2 KV heads) must not be assumed
        # equal for ever, or the first batch that differs recompiles.
        torch.fx.experimental._config.use_duck_shape = False
        self._compiled_layer = torch.compile(
            layer_function(self.variant), dynamic=True,
            options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
        try:
            for batch in (1, min(2, self.max_batch_size)):  # size 1 is specialised; 2 covers every larger batch
                self.decode([0] * batch, [1] * batch)
        # Broad on purpose: any compiler failure leaves a working eager decoder.
        except Exception:  # noqa: BLE001
            log.exception("torch.compile of the decode step failed; decoding eagerly")
            self._compiled_layer = None

    def _tokens(self, rows: list[list[int]]) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def prefill(self, slot: int, tokens: list[int], start: int = 0) -> torch.Tensor:
        """Feed prompt tokens at positions `start..` of `slot`; logits `[vocab]` after the last one."""
        return self.model(self._tokens([tokens]), self.cache, slice(slot, slot + 1), [start])[0]

    def prefill_many(self, first_slot: int, prompts: list[list[int]]) -> torch.Tensor:
        """Prefill whole prompts into slots `first_slot..` in one padded pass; logits `[B, vocab]`."""
        width = max(len(p) for p in prompts)
        rows = [p + [0] * (width - len(p)) for p in prompts]
        slots = slice(first_slot, first_slot + len(prompts))
        return self.model(self._tokens(rows), self.cache, slots, [0] * len(prompts),
                          lengths=[len(p) for p in prompts])

    def prefill_rows(self, first_slot: int, rows: list[list[int]], start: int) -> torch.Tensor:
        """Feed equally long rows of tokens at positions `start..` of slots `first_slot..` (scored candidates);
        logits `[B, T, vocab]` of every token."""
        slots = slice(first_slot, first_slot + len(rows))
        return self.model(self._tokens(rows), self.cache, slots, [start] * len(rows), last_only=False)

    def decode(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One step for the sequences in slots 0..B-1: token b goes at `positions[b]`; logits `[B, vocab]`."""
        batch = len(tokens)
        if self._compiled_layer is not None:
            return self.model.decode_step(tokens, positions, self.cache, self._compiled_layer)
        return self.model(self._tokens([[t] for t in tokens]), self.cache, slice(0, batch), positions)

    def move_slot(self, source: int, target: int, length: int) -> None:
        """Move a row's cache to another slot (compaction after a row leaves); the source slot is not read again."""
        self.cache.copy_slot(source, target, length)

    def copy_slot(self, source: int, target: int, length: int) -> None:
        """Copy a row's cache to another slot, the source staying as it is (a beam's fork, a scoring row)."""
        self.cache.copy_slot(source, target, length)

    def release_slots(self, first: int) -> None:
        """Slots `first..` hold no row any more (a cache that lends memory to slots takes it back)."""
