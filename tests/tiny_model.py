"""The tiny random-weight Llama of the unit tests, with the tiny tokenizer (tests/tiny_tokenizer.py), prepared
by the weights command: a fast stand-in for SmolLM2 that needs nothing from `weights/`.

The checkpoints are saved by transformers, which is also the "any local Hugging Face Llama checkpoint" path
of `python -m workers.preparation --source DIR`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_tokenizer import CONTEXT_LENGTH, special_token_ids, tiny_tokenizer, write_tokenizer_files

TINY_CONFIG = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": CONTEXT_LENGTH, "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True, "initializer_range": 0.2,
}
"""Toy sizes (the vocabulary is the tiny tokenizer's). initializer_range 0.2 rather than transformers' 0.02:
the logits then spread enough that greedy output depends on the context instead of repeating one token, so
a wrong cache row, mask or position changes the tokens."""


def make_tiny_checkpoint(folder: Path, seed: int = 0, **overrides) -> Path:
    """Save a random tiny Llama (transformers, safetensors) and the tiny tokenizer's files into `folder`;
    `overrides` change the config (other layouts, unsupported ones)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    ids = special_token_ids()
    config = {**TINY_CONFIG, **ids, "pad_token_id": ids["eos_token_id"],
              "vocab_size": tiny_tokenizer().get_vocab_size(), **overrides}
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(folder)
    return write_tokenizer_files(folder)


def prepare_tiny(tmp_path_factory, name: str, **overrides) -> Path:
    """A tiny checkpoint run through `workers.preparation.command.prepare` (fp32 folder with int8/ inside)."""
    from workers.preparation.command import prepare

    source = make_tiny_checkpoint(tmp_path_factory.mktemp(f"{name}-checkpoint"), **overrides)
    out = tmp_path_factory.mktemp(f"{name}-prepared") / "weights"
    prepare(source, out)
    return out


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """The prepared tiny model folder (fp32 + int8), built once per test session."""
    return prepare_tiny(tmp_path_factory, "tiny")
