"""The INT8 state dict the CPU pool loads: SmoothQuant, then symmetric INT8 per output channel, offline.

Each linear weight `<name>` becomes `<name>_int8` and `<name>_scale`, and its rounding residual the same
way (`<name>_int8_residual`, `<name>_scale_residual`): the names `workers.engine.int8.linear` loads
(`QUANTIZED_SUFFIXES`). Other tensors stay as they are, in fp32.
"""

from __future__ import annotations

from pathlib import Path

import torch

from shared.tokenizer import TextTokenizer
from workers.engine.llama import LlamaConfig
from workers.engine.weights import load_state_dict
from workers.preparation.smoothing import activation_maxima, calibration_text, smooth_state_dict

LINEAR_SUFFIXES = ("_proj.weight", "lm_head.weight")

CALIBRATION_TOKENS = 2048
"""Tokens of calibration text SmoothQuant's activation maxima are measured on, in batches of 512."""


def is_linear_weight(name: str) -> bool:
    """Whether a Hugging Face Llama tensor name is a linear layer's weight (quantized offline)."""
    return name.endswith(LINEAR_SUFFIXES)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel INT8: returns (int8 `[out, in]`, fp32 scale `[out]`)."""
    weight = weight.float()
    scale = (weight.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    quantized = torch.clamp(torch.round(weight / scale[:, None]), -127, 127).to(torch.int8)
    return quantized, scale


def quantize_state_dict(state: dict[str, torch.Tensor], tie_word_embeddings: bool) -> dict[str, torch.Tensor]:
    """Linear weights become INT8 + scales and their rounding residual INT8 + scales; the rest stays fp32."""
    if tie_word_embeddings and "lm_head.weight" not in state:
        state = {**state, "lm_head.weight": state["model.embed_tokens.weight"]}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if is_linear_weight(name):
            quantized, scale = quantize_weight(tensor)
            residual = tensor.float() - quantized.float() * scale[:, None]
            out[f"{name}_int8"], out[f"{name}_scale"] = quantized, scale
            out[f"{name}_int8_residual"], out[f"{name}_scale_residual"] = quantize_weight(residual)
        else:
            out[name] = tensor.float().contiguous()
    return out


def int8_state_dict(folder: Path, config: dict) -> dict[str, torch.Tensor]:
    """The fp32 weights prepared in `folder`, smoothed (calibrated on fixed text) and quantized."""
    shape = LlamaConfig.from_dict(config)
    state = load_state_dict(folder)
    tokens = TextTokenizer(folder).encode(calibration_text())
    batches = [tokens[i: i + 512] for i in range(0, min(len(tokens), CALIBRATION_TOKENS), 512)]
    state = smooth_state_dict(shape, state, activation_maxima(shape, state, batches))
    return quantize_state_dict(state, tie_word_embeddings=False)
