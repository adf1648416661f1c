"""INT8 linear layers on fbgemm, with activations quantized per row.

Weights: symmetric INT8 per output channel, made offline (`quantize_state_dict`).
Activations: torch's dynamic quantized Linear picks one scale for the whole batch, so a row's result
changes with its neighbours (and an outlier row degrades every other row). Here each row is divided by
its own max magnitude first and quantized with a fixed scale (8- or 7-bit codes, by CPU: see int8_gemm),
then the output row is scaled back: one fbgemm GEMM for the batch, but every row is computed exactly as if
it ran alone.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from workers.engine.int8_gemm import ACTIVATION_LEVELS, eager_int8_gemm, pack_weights, register, release

LINEAR_SUFFIXES = ("_proj.weight", "lm_head.weight")


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
    """Linear weights become `<name>_int8` + `<name>_scale`; other tensors stay as they are, in fp32."""
    if tie_word_embeddings and "lm_head.weight" not in state:
        state = {**state, "lm_head.weight": state["model.embed_tokens.weight"]}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if is_linear_weight(name):
            out[f"{name}_int8"], out[f"{name}_scale"] = quantize_weight(tensor)
        else:
            out[name] = tensor.float().contiguous()
    return out


class Int8Linear(nn.Module):
    """`y = x @ W.T` with INT8 W and per-row INT8 activations through fbgemm; no bias (Llama has none)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.empty(out_features))
        self.packed = None

    @classmethod
    def like(cls, linear: nn.Linear) -> Int8Linear:
        """An empty INT8 layer of the same shape (used on the meta device before loading)."""
        return cls(linear.in_features, linear.out_features)

    def pack(self) -> None:
        """Hand the loaded weights to fbgemm in its own layout; the buffers are then dropped."""
        self.packed = pack_weights(self.weight_int8, self.weight_scale)
        key = register(self.packed)
        weakref.finalize(self, release, key)
        self.register_buffer("weights_key", torch.tensor(key), persistent=False)
        self.weight_int8 = self.weight_scale = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in]; each row gets its own scale, so batching cannot change any row's result.
        # abs().amax(), not vector_norm(inf): the same values, ~7x faster eagerly on prefill-sized rows.
        row_max = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12)
        # Compiled code must go through the registered op; eager code may call its kernel directly.
        gemm = torch.ops.llm_server.int8_gemm if torch.compiler.is_compiling() else eager_int8_gemm
        return gemm(x / row_max, self.weights_key, self.out_features, ACTIVATION_LEVELS) * row_max


def pack_all(model: nn.Module) -> None:
    """Pack every `Int8Linear` of a loaded model."""
    for module in model.modules():
        if isinstance(module, Int8Linear):
            module.pack()
