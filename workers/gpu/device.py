"""The GPU worker's device and dtype (WORKER_DEVICE, WORKER_DTYPE), and how many KV positions it can hold."""

from __future__ import annotations

import logging
import os

import torch

from shared.exceptions import ConfigurationError
from workers.engine.llama import LlamaConfig

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
"""WORKER_DTYPE's values, `auto` aside."""

GPU_MEMORY_SHARE = 0.9
"""At most this share of the GPU memory free after loading goes to the KV cache; the rest is for activations,
the logits of a step and the CUDA graphs' pool."""


def resolve_device(name: str) -> torch.device:
    """WORKER_DEVICE as a device: `cpu`, or a CUDA device that exists (ConfigurationError, naming it, if not)."""
    device = torch.device(name)
    if device.type != "cuda":
        return device
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not torch.cuda.is_available():
        raise ConfigurationError(
            f"WORKER_DEVICE={name}: no CUDA device (torch {torch.__version__}, built for CUDA {torch.version.cuda}, "
            f"CUDA_VISIBLE_DEVICES={visible!r}); install the CUDA build of torch (README, 'GPU workers') or set "
            "WORKER_DEVICE=cpu to run the GPU decoder on the CPU")
    count = torch.cuda.device_count()
    index = 0 if device.index is None else device.index
    if index >= count:
        raise ConfigurationError(f"WORKER_DEVICE={name}: this process sees {count} GPU(s), cuda:0..cuda:{count - 1} "
                                 f"(CUDA_VISIBLE_DEVICES={visible!r})")
    return torch.device("cuda", index)


def native_bf16(device: torch.device) -> bool:
    """Whether the GPU computes in bf16 itself (compute capability 8.0 and up), not by emulation."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """WORKER_DTYPE for `device`: `auto` is bf16 on a GPU that has it, else fp16, and fp32 on the CPU."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if native_bf16(device) else torch.float16
    if name not in DTYPES:
        raise ConfigurationError(f"WORKER_DTYPE must be one of auto, {', '.join(DTYPES)}, not {name!r}")
    if DTYPES[name] is torch.bfloat16 and device.type == "cuda" and not native_bf16(device):
        log.warning("WORKER_DTYPE=bfloat16 on %s, which has no native bf16 (compute capability below 8.0): it is "
                    "emulated, slowly; float16 is native there", torch.cuda.get_device_name(device))
    return DTYPES[name]


def kv_bytes_per_position(config: LlamaConfig, dtype: torch.dtype) -> int:
    """Keys and values of one token in every layer."""
    return config.num_layers * 2 * config.num_kv_heads * config.head_dim * dtype.itemsize


def kv_positions(config: LlamaConfig, dtype: torch.dtype, device: torch.device, budget: int) -> int:
    """KV positions for the cache: MAX_TOKENS_IN_FLIGHT, and on a GPU no more than its free memory holds."""
    per_position = kv_bytes_per_position(config, dtype)
    if device.type != "cuda":
        log.info("KV cache: %d positions (%.2f GiB), MAX_TOKENS_IN_FLIGHT", budget, budget * per_position / 2**30)
        return budget
    free, total = torch.cuda.mem_get_info(device)
    fits = int(free * GPU_MEMORY_SHARE) // per_position
    positions = min(budget, fits)
    log.info("GPU %s (%s): %.2f GiB free of %.2f GiB after loading the weights; KV cache: %d positions (%.2f GiB, "
             "%s)", device, torch.cuda.get_device_name(device), free / 2**30, total / 2**30, positions,
             positions * per_position / 2**30,
             "MAX_TOKENS_IN_FLIGHT" if positions == budget else f"what fits: MAX_TOKENS_IN_FLIGHT={budget} does not")
    return positions


def warn_if_short(positions: int, max_seq_len: int) -> None:
    """Say so when the KV cache cannot hold one request of the whole context: such requests will be refused."""
    if positions < max_seq_len:
        log.warning("the KV cache holds %d positions, fewer than MAX_SEQ_LEN=%d: requests whose prompt + max_tokens "
                    "exceed %d fail on this worker with invalid_job", positions, max_seq_len, positions)
