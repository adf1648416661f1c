"""CUDA decoder for GPU workers: bf16 (fp16 where bf16 is unsupported) with a static KV cache.

With `device="cpu"` the same code runs in fp32, which is how it is tested without a GPU and how the
INT8 decoder's results are checked against a reference.
"""

from __future__ import annotations

from pathlib import Path

import torch

from shared.exceptions import ConfigurationError
from shared.model_files import read_config
from workers.engine.decoder import Decoder
from workers.engine.llama import LlamaConfig, build_model
from workers.engine.weights import fuse_projections, load_state_dict


def cuda_dtype() -> torch.dtype:
    """bf16 where the GPU supports it, else fp16."""
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


class CUDADecoder(Decoder):
    """The GPU pool's decoder; `device="cpu"` runs it in fp32 for tests and reference checks."""

    static_cache = True

    def __init__(self, *, device: str = "cuda", **kwargs):
        if device == "cuda" and not torch.cuda.is_available():
            raise ConfigurationError("no CUDA device: set WORKER_DEVICE=cpu to run the GPU decoder on the CPU")
        self.device = torch.device(device)
        self.dtype = cuda_dtype() if self.device.type == "cuda" else torch.float32
        self.static_cache = self.device.type == "cuda"
        super().__init__(**kwargs)

    def load_weights(self, folder: Path | str) -> CUDADecoder:
        """Load the prepared (fp32/bf16 safetensors) weights onto the device in its dtype."""
        config = LlamaConfig.from_dict(read_config(folder))
        state = {key: value.to(self.device, self.dtype) for key, value in load_state_dict(folder).items()}
        self._attach(build_model(config, fuse_projections(state)))
        return self
