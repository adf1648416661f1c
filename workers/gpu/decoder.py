"""CUDA decoder for GPU workers: bf16 (fp16 where bf16 is not native), a paged KV cache within
MAX_TOKENS_IN_FLIGHT, and the decode step replayed from CUDA graphs.

With `device="cpu"` the same code runs (fp32 by default, or bf16 / fp16 as asked), which is how it is tested
without a GPU and how the INT8 decoder's results are checked against a reference.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from shared.model_files import read_config
from shared.settings import Settings
from workers.engine.decoder import Decoder
from workers.engine.llama import LlamaConfig, build_model
from workers.engine.weights import fuse_projections, load_state_dict
from workers.gpu.device import kv_positions, resolve_device, resolve_dtype, warn_if_short
from workers.gpu.graphs import StaticDecode
from workers.gpu.paged_cache import PagedKVCache

log = logging.getLogger(__name__)


class CUDADecoder(Decoder):
    """The GPU pool's decoder; `device="cpu"` runs it on the CPU for tests and reference checks.

    `dtype`: a WORKER_DTYPE value (`auto`: bf16 on a GPU that has it, else fp16; fp32 on the CPU).
    `max_tokens_in_flight` sizes the KV cache (default: every slot at `max_seq_len`). `compile_decode`
    replays the decode step from CUDA graphs; on the CPU it runs the same bucketed step eagerly.
    """

    def __init__(self, *, device: str = "cuda", dtype: str = "auto", max_tokens_in_flight: int | None = None,
                 **kwargs):
        self.device = resolve_device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # graphs, streams and the allocator follow the current device
        self.dtype = resolve_dtype(dtype, self.device)
        self.static_cache = self.device.type == "cuda"
        self.max_tokens_in_flight = max_tokens_in_flight
        self.static: StaticDecode | None = None
        super().__init__(**kwargs)

    @classmethod
    def from_settings(cls, settings: Settings) -> CUDADecoder:
        """The decoder as a GPU worker loads it."""
        decoder = cls(device=settings.worker_device, dtype=settings.worker_dtype,
                      max_tokens_in_flight=settings.max_tokens_in_flight, max_batch_size=settings.max_batch_size,
                      max_seq_len=settings.max_seq_len, threads=settings.torch_threads,
                      compile_decode=settings.compile_decode and settings.worker_device != "cpu")
        return decoder.load_weights(settings.model_path)

    def load_weights(self, folder: Path | str) -> CUDADecoder:
        """Load the prepared (fp32/bf16 safetensors) weights onto the device in its dtype, fusing as it goes."""
        config = LlamaConfig.from_dict(read_config(folder))
        state = fuse_projections(load_state_dict(folder, self.device, self.dtype))
        self._attach(build_model(config, state))
        return self

    def batch_cache(self) -> PagedKVCache:
        """A pool of MAX_TOKENS_IN_FLIGHT positions (fewer if the GPU's free memory holds fewer), lent to slots."""
        config = self.config
        budget = self.max_tokens_in_flight or self.max_batch_size * self.max_seq_len
        self.max_tokens_in_flight = kv_positions(config, self.dtype, self.device, budget)
        warn_if_short(self.max_tokens_in_flight, self.max_seq_len)
        return PagedKVCache(num_layers=config.num_layers, max_slots=self.max_batch_size,
                            num_kv_heads=config.num_kv_heads, head_dim=config.head_dim, max_len=self.max_seq_len,
                            max_tokens=self.max_tokens_in_flight, dtype=self.dtype, device=self.device)

    @property
    def token_capacity(self) -> int:
        return self.max_tokens_in_flight

    @property
    def decode_is_compiled(self) -> bool:
        return self.static is not None

    @property
    def can_capture(self) -> bool:
        """Whether the decode step can be captured as CUDA graphs (on the CPU it runs bucketed, eagerly)."""
        return self.device.type == "cuda"

    def _compile_decode_layer(self) -> None:
        """Capture the decode step's CUDA graphs now, before any request; on the CPU, bucket it all the same."""
        self.static = StaticDecode(self.model, self.cache, self.max_batch_size, self.max_seq_len)
        if not self.can_capture:
            return
        try:
            self.static.capture()
        # Broad on purpose: a step that cannot be captured still decodes, eagerly.
        except Exception:  # noqa: BLE001
            log.exception("capturing the decode step's CUDA graphs failed; decoding eagerly")
            self.static = None
            return
        log.info("decode step captured as %d CUDA graphs (batch buckets %s, length buckets %s)",
                 self.static.captured, self.static.batch_sizes, self.static.lengths)

    def prefill(self, slot: int, tokens: list[int], start: int = 0) -> torch.Tensor:
        self.cache.release_from(slot + 1)  # the slots above the one being prefilled are free (engine layout)
        return super().prefill(slot, tokens, start)

    def prefill_many(self, first_slot: int, prompts: list[list[int]]) -> torch.Tensor:
        self.cache.release_from(first_slot + len(prompts))
        return super().prefill_many(first_slot, prompts)

    def decode(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        if self.static is not None:
            return self.static.run(tokens, positions)
        return super().decode(tokens, positions)

    def move_slot(self, source: int, target: int, length: int) -> None:
        """Hand a sequence's blocks to another slot (compaction): nothing is copied."""
        self.cache.move_slot(source, target, length)

    def release_slots(self, first: int) -> None:
        """Take back the blocks of slots `first..` (their rows have left)."""
        self.cache.release_from(first)
