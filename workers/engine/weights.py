"""Reading prepared weights: safetensors only (never pickle), one file or shards."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from shared.model_files import require_model_dir


def load_state_dict(folder: Path | str) -> dict[str, torch.Tensor]:
    """Every tensor of every `*.safetensors` file in `folder`."""
    folder = require_model_dir(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {folder}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    return state


def fuse_projections(state: dict[str, torch.Tensor], suffix: str = "weight") -> dict[str, torch.Tensor]:
    """Concatenate q/k/v and gate/up rows so each layer runs 4 matmuls instead of 7."""
    fused = dict(state)
    layer_prefixes = sorted({key.rsplit(".self_attn.", 1)[0] for key in state if ".self_attn.q_proj." in key})
    for prefix in layer_prefixes:
        fused[f"{prefix}.self_attn.qkv_proj.{suffix}"] = torch.cat(
            [fused.pop(f"{prefix}.self_attn.{name}_proj.{suffix}") for name in "qkv"]
        )
        fused[f"{prefix}.mlp.gate_up_proj.{suffix}"] = torch.cat(
            [fused.pop(f"{prefix}.mlp.{name}_proj.{suffix}") for name in ("gate", "up")]
        )
    return fused
