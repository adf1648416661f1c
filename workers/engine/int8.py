"""INT8 linear layers on fbgemm, with activations quantized per row.

Weights: symmetric INT8 per output channel, made offline (`quantize_state_dict`).
Activations: torch's dynamic quantized Linear picks one scale for the whole batch, so a row's result
changes with its neighbours (and an outlier row degrades every other row). Here each row is divided by
its own max magnitude first and quantized with a fixed 7-bit scale, then the output row is scaled back:
one fbgemm GEMM for the batch, but every row is computed exactly as if it ran alone. 7 bits, as torch's
`reduce_range`, because AVX2's u8 x s8 multiply-add saturates at 16 bits with full-range activations.
"""

from __future__ import annotations

import itertools
import warnings
import weakref

import torch
from torch import nn

ACTIVATION_LEVELS = 63
"""Row values map to [-63, 63] around zero point 64: 7-bit codes, safe from AVX2 saturation."""

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


_fbgemm_linear = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32.default  # the overload: no per-call argument scan

PACKED_WEIGHTS: dict[int, object] = {}
"""fbgemm's packed weights by key: torch.compile cannot trace the packed object, so the op takes its key."""

_next_key = itertools.count()


# A plain library op rather than torch.library.custom_op: the latter's Python wrapper costs ~50 us a call,
# which over the 121 linears of a decode step would undo much of what compiling gains.
_library = torch.library.Library("llm_server", "DEF")
_library.define("int8_gemm(Tensor rows, Tensor weights_key, int out_features) -> Tensor")


def int8_gemm(rows: torch.Tensor, weights_key: torch.Tensor, out_features: int) -> torch.Tensor:
    """fbgemm's INT8 GEMM on rows already scaled into [-1, 1], as one opaque op for torch.compile.

    The key is a tensor, not an int: an int would be baked into the compiled graph, and one graph
    serves every layer.
    """
    return _fbgemm_linear(rows, 1.0 / ACTIVATION_LEVELS, ACTIVATION_LEVELS + 1, PACKED_WEIGHTS[int(weights_key)])


_library.impl("int8_gemm", int8_gemm, "CPU")


@torch.library.register_fake("llm_server::int8_gemm")
def _(rows: torch.Tensor, weights_key: torch.Tensor, out_features: int) -> torch.Tensor:
    return rows.new_empty((*rows.shape[:-1], out_features))


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
        zero_points = torch.zeros(self.out_features, dtype=torch.long)
        with warnings.catch_warnings():  # fbgemm's prepack still takes a quantized tensor; nothing else does
            warnings.simplefilter("ignore", UserWarning)
            weight = torch._make_per_channel_quantized_tensor(
                self.weight_int8, self.weight_scale.double(), zero_points, 0)
        self.packed = torch.ops.quantized.linear_prepack(weight, None)
        key = next(_next_key)
        PACKED_WEIGHTS[key] = self.packed
        weakref.finalize(self, PACKED_WEIGHTS.pop, key, None)
        self.register_buffer("weights_key", torch.tensor(key), persistent=False)
        self.weight_int8 = self.weight_scale = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in]; each row gets its own scale, so batching cannot change any row's result.
        row_max = torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True).clamp_min(1e-12)
        # Compiled code must go through the registered op; eager code calls the same function directly.
        gemm = torch.ops.llm_server.int8_gemm if torch.compiler.is_compiling() else int8_gemm
        return gemm(x / row_max, self.weights_key, self.out_features) * row_max


def pack_all(model: nn.Module) -> None:
    """Pack every `Int8Linear` of a loaded model."""
    for module in model.modules():
        if isinstance(module, Int8Linear):
            module.pack()
