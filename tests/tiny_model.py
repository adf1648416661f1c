"""A tiny random-weight Llama checkpoint with the real tokenizer, prepared by the weights command.

Fast stand-in for SmolLM2 in unit tests; it also exercises the "any local Hugging Face Llama
checkpoint" path of `python -m workers.preparation --source DIR`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REAL_WEIGHTS = ROOT / "weights"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def make_tiny_checkpoint(folder: Path, seed: int = 0) -> Path:
    """Save a 2-layer Llama with random weights and SmolLM2's tokenizer into `folder`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                         rope_theta=10000.0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (REAL_WEIGHTS / name).is_file():
            shutil.copy2(REAL_WEIGHTS / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """A prepared tiny model folder (fp32 + int8), built once per test session."""
    from workers.preparation.command import prepare

    source = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-checkpoint"))
    out = tmp_path_factory.mktemp("tiny-prepared") / "weights"
    prepare(source, out)
    return out
