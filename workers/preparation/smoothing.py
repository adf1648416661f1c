"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights before INT8 quantization.

Llama's linear inputs have a few channels far larger than the rest, so a per-row INT8 scale leaves the
ordinary channels with a couple of levels. Scaling input channel j down by s_j and the weight column up
by s_j leaves the product unchanged; s_j = max|X_j|^a / max|W_j|^(1-a) balances the two. The division is
folded into the op that produces the input: the RMSNorm weight (qkv, gate/up, LM head), the up
projection's rows (down), the value projection's rows (output projection; per KV head under GQA).
Runs offline in the weights command, on the fp32 weights with Hugging Face names.
"""

from __future__ import annotations

import torch
from torch import nn

from workers.engine.kv_cache import KVCache
from workers.engine.llama import LlamaConfig, LlamaModel, build_model
from workers.engine.weights import fuse_projections

ALPHA = 0.5
"""Migration strength: 0.5 splits the difficulty evenly between activations and weights (the paper's default)."""


def calibration_text() -> str:
    """Fixed English prose and code from the standard library (disjoint from the perplexity text)."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return "\n".join(topics[name] for name in ("for", "while", "class", "function", "try"))


@torch.inference_mode()
def activation_maxima(config: LlamaConfig, state: dict[str, torch.Tensor], batches: list[list[int]]):
    """Per-input-channel max |x| of every linear layer over calibration token batches."""
    model: LlamaModel = build_model(config, fuse_projections(dict(state)))
    maxima: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(module, inputs, output):
            seen = inputs[0].reshape(-1, inputs[0].shape[-1]).abs().amax(dim=0)
            maxima[name] = torch.maximum(maxima[name], seen) if name in maxima else seen
        return hook

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            module.register_forward_hook(record(name))
    longest = max(len(b) for b in batches)
    cache = KVCache(num_layers=config.num_layers, max_slots=1, num_kv_heads=config.num_kv_heads,
                    head_dim=config.head_dim, max_len=longest, dtype=torch.float32, device="cpu")
    for tokens in batches:
        model(torch.tensor([tokens]), cache, slice(0, 1), [0], last_only=False)
    return maxima


def _factors(act_max: torch.Tensor, weight_max: torch.Tensor) -> torch.Tensor:
    return (act_max.clamp(min=1e-5) ** ALPHA / weight_max.clamp(min=1e-5) ** (1 - ALPHA)).clamp(min=1e-5)


def smooth_state_dict(config: LlamaConfig, state: dict[str, torch.Tensor], maxima: dict[str, torch.Tensor]):
    """A copy of `state` (fp32, HF names, explicit lm_head) with smoothing applied; same function."""
    state = {key: value.float().clone() for key, value in state.items()}
    if "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    group = config.num_heads // config.num_kv_heads
    for i in range(config.num_layers):
        p = f"model.layers.{i}"
        attn, mlp = f"{p}.self_attn", f"{p}.mlp"
        qkv = [f"{attn}.{n}_proj.weight" for n in "qkv"]
        s = _factors(maxima[f"layers.{i}.self_attn.qkv_proj"], torch.cat([state[k] for k in qkv]).abs().amax(0))
        for key in qkv:
            state[key] *= s
        state[f"{p}.input_layernorm.weight"] /= s

        gate_up = [f"{mlp}.gate_proj.weight", f"{mlp}.up_proj.weight"]
        s = _factors(maxima[f"layers.{i}.mlp.gate_up_proj"], torch.cat([state[k] for k in gate_up]).abs().amax(0))
        for key in gate_up:
            state[key] *= s
        state[f"{p}.post_attention_layernorm.weight"] /= s

        s = _factors(maxima[f"layers.{i}.mlp.down_proj"], state[f"{mlp}.down_proj.weight"].abs().amax(0))
        state[f"{mlp}.down_proj.weight"] *= s
        state[f"{mlp}.up_proj.weight"] /= s[:, None]

        # o_proj input channel (head h, dim d) comes from value head h // group: one factor per KV channel.
        shape = (config.num_kv_heads, group, config.head_dim)
        act = maxima[f"layers.{i}.self_attn.o_proj"].view(shape).amax(1)
        weight = state[f"{attn}.o_proj.weight"].abs().amax(0).view(shape).amax(1)
        s_kv = _factors(act, weight)  # [kv_heads, head_dim]
        state[f"{attn}.o_proj.weight"] *= s_kv[:, None, :].expand(shape).reshape(-1)
        state[f"{attn}.v_proj.weight"] /= s_kv.reshape(-1)[:, None]

    s = _factors(maxima["lm_head"], state["lm_head.weight"].abs().amax(0))
    state["lm_head.weight"] *= s
    state["model.norm.weight"] /= s
    return state
