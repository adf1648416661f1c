"""The INT8 GEMM every INT8 linear runs: fbgemm on packed weights that the op finds by key.

`llm_server::int8_gemm(rows, weights_key, out_features, levels)` is one opaque op to torch.compile, which
cannot trace fbgemm's packed-weight object; the layer passes its key instead, as a tensor so that one
compiled graph serves every layer. The op is C++ (gemm.cpp, built on first use by torch's extension
builder and cached on disk): a compiled decode step calls it once per linear layer, and a Python kernel
costs more per call (see BENCHMARKS.md, Targets). Where no compiler works, a Python kernel with the same
results takes its place.

Activation codes: rows arrive scaled into [-1, 1] and are quantized with `levels` codes per sign around
zero point `levels + 1`. 8-bit codes (127) where the CPU multiplies u8 x s8 into 32 bits (AVX512-VNNI);
7-bit codes (63), as torch's `reduce_range`, where it has only AVX2's multiply-add, which saturates at
16 bits with full-range activations. A probe at import decides.
"""

from __future__ import annotations

import itertools
import logging
import os
import warnings
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# The overload: no per-call argument scan.
fbgemm_linear = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32.default

SCHEMA = "int8_gemm(Tensor rows, Tensor weights_key, int out_features, int levels) -> Tensor"


def pack_weights(weight_int8: torch.Tensor, scale: torch.Tensor):
    """fbgemm's packed weights for an INT8 `[out, in]` matrix with one scale per output channel."""
    zero_points = torch.zeros(weight_int8.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # fbgemm's prepack still takes a quantized tensor; nothing else does
        warnings.simplefilter("ignore", UserWarning)
        weight = torch._make_per_channel_quantized_tensor(weight_int8, scale.double(), zero_points, 0)
    return torch.ops.quantized.linear_prepack(weight, None)


def full_range_activations_are_exact() -> bool:
    """Whether fbgemm multiplies 8-bit activation codes without saturating, on this CPU.

    The worst case for a 16-bit multiply-add: every code 255 against every weight 127, where pairs sum to
    64770. Exact, the row's result is 64 x 127 x scale; saturated, it is about half that.
    """
    packed = pack_weights(torch.full((1, 64), 127, dtype=torch.int8), torch.ones(1))
    result = fbgemm_linear(torch.ones(1, 64), 1.0 / 127, 128, packed)
    return abs(result.item() - 64 * 127) < 1e-3


ACTIVATION_LEVELS = 127 if full_range_activations_are_exact() else 63
"""Activation codes per sign: 8-bit codes where this CPU multiplies them exactly, else 7-bit."""


def _load_native_op() -> bool:
    """Build (once; later loads reuse the cached build) and register the C++ op; False if that fails."""
    from torch.utils import cpp_extension

    try:
        if not cpp_extension.is_ninja_available():  # the builder runs `ninja` from PATH; pip installs one
            import ninja

            os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
        cpp_extension.load(name="llm_server_int8_gemm", sources=[str(Path(__file__).with_name("gemm.cpp"))],
                           extra_cflags=["-O2"], is_python_module=False)
        return True
    # Broad on purpose: no compiler, headers or ninja: the Python kernel does the same work.
    except Exception:  # noqa: BLE001
        log.warning("could not build the C++ INT8 GEMM op; using its Python kernel (slower per call)",
                    exc_info=True)
        return False


_packed_weights: dict[int, object] = {}
_next_key = itertools.count()


def python_int8_gemm(rows: torch.Tensor, weights_key: torch.Tensor, out_features: int, levels: int) -> torch.Tensor:
    """The op's Python kernel: the same fbgemm call as the C++ one."""
    return fbgemm_linear(rows, 1.0 / levels, levels + 1, _packed_weights[int(weights_key)])


NATIVE = _load_native_op()
if NATIVE:
    eager_int8_gemm = torch.ops.llm_server.int8_gemm.default
else:
    # A plain library op rather than torch.library.custom_op, whose Python wrapper costs more again per call.
    _library = torch.library.Library("llm_server", "DEF")
    _library.define(SCHEMA)
    _library.impl("int8_gemm", python_int8_gemm, "CPU")
    eager_int8_gemm = python_int8_gemm  # eager code skips the dispatcher's round trip into Python


@torch.library.register_fake("llm_server::int8_gemm")
def _(rows: torch.Tensor, weights_key: torch.Tensor, out_features: int, levels: int) -> torch.Tensor:
    return rows.new_empty((*rows.shape[:-1], out_features))


def register(packed) -> int:
    """Make packed weights reachable by the op (the C++ registry, or the Python kernel's); returns their key."""
    key = next(_next_key)
    if NATIVE:
        torch.ops.llm_server.keep_packed(key, packed)
    else:
        _packed_weights[key] = packed
    return key


def release(key: int) -> None:
    """Forget the packed weights of `key` (their layer is gone)."""
    if NATIVE:
        torch.ops.llm_server.drop_packed(key)
    else:
        _packed_weights.pop(key, None)
