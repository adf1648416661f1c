"""What bench.precision_ablation's "exact 4-bit weights" rows rest on, checked on the real weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from bench.precision_ablation import Int4Linear, q4_1_grid
from tests.engine_helpers import REAL_WEIGHTS

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def layer_weights() -> dict[str, torch.Tensor]:
    """Layer 0's linear weights as the weights command wrote them (fp32, dequantized from the GGUF)."""
    with safe_open(str(REAL_WEIGHTS / "model.safetensors"), "pt") as weights:
        return {name: weights.get_tensor(name) for name in weights.keys()
                if name.startswith("model.layers.0.") and name.endswith("_proj.weight")}


def test_every_layer_linear_is_exactly_a_q4_1_grid(layer_weights):
    assert len(layer_weights) == 7
    for name, weight in layer_weights.items():
        codes, scale, minimum = q4_1_grid(weight)  # asserts the reconstruction is exact
        assert codes.min() >= 0 and codes.max() <= 15, name
        assert len(codes.unique()) > 8, name  # a real 4-bit grid, not a degenerate fit


def test_the_int4_kernel_computes_the_fp32_weights_up_to_bf16_rounding(layer_weights):
    weight = layer_weights["model.layers.0.mlp.down_proj.weight"]
    x = torch.randn(3, weight.shape[1])
    expected = F.linear(x.bfloat16().float(), weight)
    # bf16 scales, zeros and results: well under 1% overall; a wrong dequantization formula is off by ~100%.
    assert (Int4Linear(weight)(x) - expected).norm() / expected.norm() < 0.01
