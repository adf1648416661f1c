"""Reading prepared weights: safetensors only (never pickle), one file or shards."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from shared.model_files import require_model_dir


def load_state_dict(folder: Path | str, device: torch.device | str = "cpu",
                    dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of every `*.safetensors` file in `folder`, each moved to `device` (floats to `dtype`) as
    it is read, so a GPU worker never holds a second whole copy of the weights on the host."""
    folder = require_model_dir(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {folder}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as tensors:
            for name in tensors.keys():
                tensor = tensors.get_tensor(name)
                state[name] = tensor.to(device, dtype if dtype is not None and tensor.is_floating_point() else None)
    return state


def fuse_projections(state: dict[str, torch.Tensor], suffix: str = "weight") -> dict[str, torch.Tensor]:
    """Concatenate q/k/v and gate/up rows so each layer runs 4 matmuls instead of 7; returns `state`.

    In place, layer by layer: a layer's parts leave `state` as its fused tensor is made, so at most one
    layer's projections exist twice (on a GPU the unfused copies would otherwise double the weights' memory).
    """
    layer_prefixes = sorted({key.rsplit(".self_attn.", 1)[0] for key in state if ".self_attn.q_proj." in key})
    for prefix in layer_prefixes:
        state[f"{prefix}.self_attn.qkv_proj.{suffix}"] = torch.cat(
            [state.pop(f"{prefix}.self_attn.{name}_proj.{suffix}") for name in "qkv"])
        state[f"{prefix}.mlp.gate_up_proj.{suffix}"] = torch.cat(
            [state.pop(f"{prefix}.mlp.{name}_proj.{suffix}") for name in ("gate", "up")])
    return state
