"""INT8 decoder for CPU workers: fbgemm INT8 linears (LM head included), fp32 everything else."""

from __future__ import annotations

from pathlib import Path

import torch

from shared.exceptions import ModelFilesMissing
from shared.model_files import read_config
from shared.settings import Settings
from workers.engine.decoder import Decoder
from workers.engine.int8.linear import QUANTIZED_SUFFIXES, Int8Linear, pack_all
from workers.engine.llama import LlamaConfig, build_model
from workers.engine.weights import fuse_projections, load_state_dict


class INT8Decoder(Decoder):
    """The CPU pool's decoder. Load with `load_quantized_weights(settings.int8_path)`."""

    cache_dtype = torch.float16

    def __init__(self, *, residual: bool = False, **options):
        """`residual`: INT8 in two passes (weights' and activations' rounding residuals too), ~16-bit
        accurate; see `Int8Linear`."""
        super().__init__(**options)
        self.residual = residual

    @property
    def variant(self) -> str:
        return f"{super().variant}_residual" if self.residual else super().variant

    def load_quantized_weights(self, folder: Path | str) -> INT8Decoder:
        """Load the INT8 weights and scales made by `python -m workers.preparation`."""
        config = LlamaConfig.from_dict(read_config(folder))
        state = load_state_dict(folder)
        if not any(name.endswith("_int8_residual") for name in state):  # made before residuals were written
            raise ModelFilesMissing(Path(folder).resolve(), "INT8 weights in the current format")
        for suffix in QUANTIZED_SUFFIXES:
            state = fuse_projections(state, f"weight_{suffix}")
        model = build_model(config, state, linear_factory=Int8Linear.like)
        pack_all(model, residual=self.residual)
        # Per-row INT8 activations turn the tiny differences of padded attention into different tokens.
        model.exact_rows = True
        self._attach(model)
        return self

    @classmethod
    def from_settings(cls, settings: Settings, **limits) -> INT8Decoder:
        """The decoder as a CPU worker loads it; `limits` may override max_batch_size and max_seq_len."""
        options = {"max_batch_size": settings.max_batch_size, "max_seq_len": settings.max_seq_len,
                   "threads": settings.torch_threads, "compile_decode": settings.compile_decode,
                   "residual": settings.int8_residual, **limits}
        return cls(**options).load_quantized_weights(settings.int8_path)
