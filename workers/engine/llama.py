"""A Llama-family decoder-only transformer written for batched serving.

Follows transformers' `LlamaForCausalLM` numerics (fp32 RMSNorm and rotary, SDPA attention) so greedy
output matches it token for token, but owns its KV cache so that sequences of different lengths share
one forward pass. q/k/v and gate/up projections are fused (see weights.fuse_projections); attention itself
is in attention.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from workers.engine.attention import Block, attention_blocks, chunk_attention, decode_attention
from workers.engine.kv_cache import KVCache


@dataclass(frozen=True, slots=True)
class LlamaConfig:
    """The shape of the network, read from a Hugging Face config.json."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    raw: dict

    @classmethod
    def from_dict(cls, config: dict) -> LlamaConfig:
        """Map a Hugging Face config dict (Llama, Mistral-style fields) onto our names."""
        heads = config["num_attention_heads"]
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            max_position_embeddings=config.get("max_position_embeddings", 2048),
            tie_word_embeddings=config.get("tie_word_embeddings", False),
            raw=config,
        )


def rotary_inverse_frequencies(config: LlamaConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling; non-default rope types reuse transformers' formulas."""
    rope = config.raw.get("rope_parameters") or config.raw.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    theta = rope.get("rope_theta", config.raw.get("rope_theta", 10000.0))
    # On the CPU even inside build_model's meta-device context: transformers' formulas copy tensors.
    with torch.device("cpu"):
        if rope_type == "default":
            exponents = torch.arange(0, config.head_dim, 2, dtype=torch.int64).float() / config.head_dim
            return 1.0 / (theta**exponents), 1.0
        from transformers import AutoConfig
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        hf_config = AutoConfig.for_model(**config.raw)
        return ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu")


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused call; same numbers as the formula below
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


@dataclass(frozen=True, slots=True)
class StepInputs:
    """What every layer of one forward pass shares: rotary tables, cache coordinates, attention blocks."""

    cos: torch.Tensor  # [B, T, 1, head_dim]
    sin_signed: torch.Tensor  # [B, T, 1, head_dim]: (-sin, +sin) halves, see apply_rotary
    rows: torch.Tensor  # [B, 1] batch row of each cache write
    positions: torch.Tensor  # [B, T] position of each token
    slots: slice
    length: int
    blocks: list[Block]  # rows that attend together (see attention.attention_blocks)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """transformers' `x * cos + rotate_half(x) * sin`, with rotate_half as a roll and a signed sin."""
    dtype = x.dtype
    x = x.float()
    rotated = x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin_signed
    return rotated.to(dtype)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        qkv_rows = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, qkv_rows, bias=False)
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, config.hidden_size, bias=False)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor):
        """Rotated queries and keys, and values, each `[B, T, heads, head_dim]`, for inputs `[B, T, hidden]`."""
        batch, steps, _ = x.shape
        qkv = self.qkv_proj(x).view(batch, steps, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        qk = apply_rotary(qkv[:, :, : self.num_heads + self.num_kv_heads], cos, sin_signed)
        return qk[:, :, : self.num_heads], qk[:, :, self.num_heads:], qkv[:, :, self.num_heads + self.num_kv_heads:]

    def output(self, out: torch.Tensor) -> torch.Tensor:
        """The output projection of attention results `[B, heads, T, head_dim]`."""
        batch, _, steps, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(batch, steps, self.num_heads * self.head_dim))

    def forward(self, x: torch.Tensor, step: StepInputs, cache: KVCache) -> torch.Tensor:
        q, k, v = self.project(x, step.cos, step.sin_signed)
        cache.write(self.layer_index, step.slots, step.rows, step.positions, k, v)
        keys, values = cache.read(self.layer_index, step.slots, step.length)  # [B, kv_heads, length, head_dim]
        keys, values = keys.to(q.dtype), values.to(q.dtype)  # a half-precision cache (INT8 decoder)
        q = q.transpose(1, 2)  # [B, heads, T, head_dim]
        return self.output(chunk_attention(q, keys, values, step.blocks))


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, step: StepInputs, cache: KVCache) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), step, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


def decode_layer(layer: DecoderLayer, x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor,
                 positions: torch.Tensor, visible: torch.Tensor, keys: torch.Tensor,
                 values: torch.Tensor) -> torch.Tensor:
    """`layer` for one new token in each of slots 0..B-1, on that layer's cache tensors.

    The unit torch.compile compiles: every argument is a tensor or a module of the same shape, so one
    compiled graph serves all layers, batch sizes and lengths. x `[B, 1, hidden]`; positions `[B, 1]`;
    visible `[B, length]`; keys/values `[slots, kv_heads, capacity, head_dim]`.
    """
    attention = layer.self_attn
    batch, length = visible.shape
    q, k, v = attention.project(layer.input_layernorm(x), cos, sin_signed)
    rows = torch.arange(batch, device=x.device)[:, None]
    keys[rows, :, positions] = k.to(keys.dtype)
    values[rows, :, positions] = v.to(values.dtype)
    out = decode_attention(q.transpose(1, 2), keys[:batch, :, :length], values[:batch, :, :length], visible)
    x = x + attention.output(out)
    return x + layer.mlp(layer.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """Embeddings, decoder layers, final norm and LM head, with parameter names as in transformers."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, index) for index in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        inverse_frequencies, self.rope_scaling = rotary_inverse_frequencies(config)
        self.register_buffer("inv_freq", inverse_frequencies, persistent=False)

    exact_rows = False
    """When True, attention runs row by row, so a row's result never depends on its batch (INT8)."""

    def step_inputs(self, starts: list[int], lengths: list[int], steps: int, slots: slice, device) -> StepInputs:
        """Rotary tables, masks and cache indices for row b's tokens at `starts[b]..starts[b]+lengths[b]-1`.

        Rows shorter than `steps` are padding at the end; their extra positions are written to the cache
        but never read: a row's later tokens overwrite them and attention stops at each row's length.
        """
        positions = torch.tensor(starts, device=device)[:, None] + torch.arange(steps, device=device)
        return StepInputs(*self.rotary_tables(positions), torch.arange(len(starts), device=device)[:, None],
                          positions, slots, max(starts) + steps,
                          attention_blocks(starts, lengths, steps, self.exact_rows, device, self.compute_dtype))

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of activations, queries included (the embeddings'; INT8 layers keep fp32 activations)."""
        return self.embed_tokens.weight.dtype

    def rotary_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin `[B, T, 1, head_dim]` for token positions `[B, T]` (see apply_rotary)."""
        freqs = positions[..., None].float() * self.inv_freq.float()  # [B, T, head_dim / 2]
        cos, sin = freqs.cos() * self.rope_scaling, freqs.sin() * self.rope_scaling
        return torch.cat((cos, cos), dim=-1)[:, :, None, :], torch.cat((-sin, sin), dim=-1)[:, :, None, :]

    @torch.no_grad()  # not inference_mode, which torch.compile does not trace
    def decode_step(self, tokens: list[int], positions: list[int], cache: KVCache,
                    run_layer=decode_layer) -> torch.Tensor:
        """Logits `[B, vocab]` for one new token per slot 0..B-1: `tokens[b]` at `positions[b]`.

        Rows attend through decode_attention, so no Python loop over rows; `run_layer` may be a compiled
        `decode_layer`.
        """
        device = self.embed_tokens.weight.device
        length = max(positions) + 1
        cache.reserve(length)
        positions = torch.tensor(positions, device=device)[:, None]
        cos, sin_signed = self.rotary_tables(positions)
        visible = torch.arange(length, device=device)[None, :] <= positions
        x = self.embed_tokens(torch.tensor(tokens, device=device)[:, None])
        for layer, keys, values in zip(self.layers, cache.keys, cache.values):
            x = run_layer(layer, x, cos, sin_signed, positions, visible, keys, values)
        return self.lm_head(self.norm(x[:, -1])).float()

    @torch.inference_mode()
    def static_decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache, length: int) -> torch.Tensor:
        """Logits `[B, vocab]` for `tokens` `[B, 1]` at `positions` `[B, 1]` of slots 0..B-1, attending over the
        first `length` positions of each: device tensors in, no host value read, so a CUDA graph can capture it
        (workers/gpu/graphs.py). The cache must already hold room for the rows' positions."""
        batch, device = tokens.shape[0], tokens.device
        cache.reserve(length)
        visible = torch.arange(length, device=device)[None, :] <= positions  # [B, length]
        mask = torch.zeros(visible.shape, dtype=self.compute_dtype, device=device).masked_fill_(~visible, -torch.inf)
        step = StepInputs(*self.rotary_tables(positions), torch.arange(batch, device=device)[:, None], positions,
                          slice(0, batch), length, [Block(slice(0, batch), 1, length, mask[:, None, None, :])])
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x, step, cache)
        return self.lm_head(self.norm(x[:, -1])).float()

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache: KVCache, slots: slice, starts: list[int],
                last_only: bool = True, lengths: list[int] | None = None) -> torch.Tensor:
        """Logits for `tokens` `[B, T]` placed at positions `starts[b]..` of slots `slots`.

        `lengths[b]` (default T) counts row b's real tokens; the rest of the row is padding.
        Returns `[B, vocab]` for the last real token of each row, or `[B, T, vocab]` with `last_only=False`.
        """
        batch, steps = tokens.shape
        lengths = lengths or [steps] * batch
        step = self.step_inputs(starts, lengths, steps, slots, tokens.device)
        cache.reserve(step.length, slots, [start + n for start, n in zip(starts, lengths)])
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x, step, cache)
        if last_only:
            x = x[:, -1] if min(lengths) == steps else x[torch.arange(batch), torch.tensor(lengths) - 1]
        return self.lm_head(self.norm(x)).float()


def build_model(config: LlamaConfig, state: dict[str, torch.Tensor], linear_factory=None) -> LlamaModel:
    """Build on the meta device, swap in other linear modules if asked, then load weights by assignment."""
    with torch.device("meta"):
        model = LlamaModel(config)
    if linear_factory is not None:
        replace_linears(model, linear_factory)
    state = {key.removeprefix("model."): value for key, value in state.items()}
    if "lm_head.weight" not in state and not any(k.startswith("lm_head.") for k in state):
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, assign=True, strict=True)
    model.inv_freq = rotary_inverse_frequencies(config)[0].to(state["embed_tokens.weight"].device)
    return model.eval()


def replace_linears(module: nn.Module, factory) -> None:
    """Replace every `nn.Linear` in place with `factory(linear)` (which may build on the meta device)."""
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, factory(child))
        else:
            replace_linears(child, factory)
