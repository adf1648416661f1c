"""INT8 linear layers on fbgemm, with activations quantized per row.

Weights: symmetric INT8 per output channel, made offline (`workers.preparation.quantize`).
Activations: torch's dynamic quantized Linear picks one scale for the whole batch, so a row's result
changes with its neighbours (and an outlier row degrades every other row). Here each row is divided by
its own max magnitude first and quantized with a fixed scale (8- or 7-bit codes, by CPU: see gemm.py),
then the output row is scaled back: one fbgemm GEMM for the batch, but every row is computed exactly as if
it ran alone.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from workers.engine.int8.gemm import ACTIVATION_LEVELS, eager_int8_gemm, pack_weights, register, release

QUANTIZED_SUFFIXES = ("int8", "scale", "int8_residual", "scale_residual")
"""What the weights command makes of a linear weight `<name>`: `<name>_<suffix>` for each suffix."""


class Int8Linear(nn.Module):
    """`y = x @ W.T` with INT8 W and per-row INT8 activations through fbgemm; no bias (Llama has none).

    With `residual`, the rounding residuals go through the same GEMM too: the weights' as extra output
    channels (W ~ W1 + W2, both INT8), the activations' as extra rows (x ~ x1 + x2 / 2L). About 16-bit
    accuracy from INT8 kernels, for a multiple of the GEMM time (see BENCHMARKS.md, Precision ablation).
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        for suffix in ("", "_residual"):
            self.register_buffer(f"weight_int8{suffix}", torch.empty(out_features, in_features, dtype=torch.int8))
            self.register_buffer(f"weight_scale{suffix}", torch.empty(out_features))
        self.residual = False

    @classmethod
    def like(cls, linear: nn.Linear) -> Int8Linear:
        """An empty INT8 layer of the same shape (used on the meta device before loading)."""
        return cls(linear.in_features, linear.out_features)

    def pack(self, residual: bool = False) -> None:
        """Hand the loaded weights to fbgemm in its own layout; the buffers are then dropped."""
        self.residual = residual
        weight, scale = self.weight_int8, self.weight_scale
        if residual:  # one matrix of 2 x out channels: y[..., :out] + y[..., out:] is x @ (W1 + W2).T
            weight = torch.cat([weight, self.weight_int8_residual])
            scale = torch.cat([scale, self.weight_scale_residual])
        key = register(pack_weights(weight, scale))
        weakref.finalize(self, release, key)
        self.register_buffer("weights_key", torch.tensor(key), persistent=False)
        self.weight_int8 = self.weight_scale = self.weight_int8_residual = self.weight_scale_residual = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in]; each row gets its own scale, so batching cannot change any row's result.
        # abs().amax(), not vector_norm(inf): the same values, much faster eagerly on prefill-sized rows.
        row_max = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12)
        rows = x / row_max
        # Compiled code must go through the registered op; eager code may call its kernel directly.
        gemm = torch.ops.llm_server.int8_gemm if torch.compiler.is_compiling() else eager_int8_gemm
        if not self.residual:
            return gemm(rows, self.weights_key, self.out_features, ACTIVATION_LEVELS) * row_max
        levels, n = ACTIVATION_LEVELS, self.out_features
        # What the GEMM's quantization of `rows` will round away, rescaled from [-1/2L, 1/2L] to [-1, 1].
        rounding = (rows - torch.round(rows * levels) / levels) * (2 * levels)
        out = gemm(torch.cat([rows, rounding]), self.weights_key, 2 * n, levels)
        first, second = out[: len(rows)], out[len(rows):]
        # x1 W1 + x1 W2 + x2 W1 / 2L; x2 W2 / 2L is below the second pass's own rounding.
        return (first[..., :n] + first[..., n:] + second[..., :n] / (2 * levels)) * row_max


def pack_all(model: nn.Module, residual: bool = False) -> None:
    """Pack every `Int8Linear` of a loaded model (`residual`: the two-pass accurate form)."""
    for module in model.modules():
        if isinstance(module, Int8Linear):
            module.pack(residual)
