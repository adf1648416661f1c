"""A tiny tokenizer made in the test session: the unit tests' stand-in for SmolLM2's, so that they run
without the prepared weights in `weights/`.

It has what the code relies on in SmolLM2's tokenizer: byte-level BPE (any text encodes, and a character
outside the training text spans several tokens), the `<|im_start|>` / `<|im_end|>` special tokens with
`<|im_end|>` as EOS, no special tokens added to raw text, and a ChatML chat template. Its vocabulary is
learnt from a few English sentences (ASCII only, so every other character is split into its bytes); tests
read ids from it instead of writing them down.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
"""Ids 0, 1, 2, as in SmolLM2's vocabulary."""

BOS, EOS = "<|im_start|>", "<|im_end|>"

CONTEXT_LENGTH = 512
"""The context length the tiny tokenizer's folder and the tiny model declare (max_position_embeddings)."""

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""ChatML, shaped as SmolLM2's template: a default system turn when the conversation has none."""

CORPUS = (
    "Hello world! Hello, world. Hello there, how are you? Hi! How can I help you today?",
    "system\nYou are a helpful assistant. Be brief.\nuser\nAnswer the question.\nassistant\nYes.\n",
    "What is the capital of France? The capital of France is Paris, a city on the river.",
    "Tell me more about the sea. The sea is wide and deep, and the sky above it is blue.",
    "The quick brown fox jumps over the lazy dog. The three primary colors are red, yellow and blue.",
    "The history of the Roman Empire is a long story. Once upon a time, in a small village, there was a word.",
    "Write a short story about the sea. Say something. Say hello. Tell me a story about a prompt.",
    "def f(x):\n    return x * 2\n\nprint(f(3))\n",
)
"""What the vocabulary is learnt from: words of the tests' prompts become whole tokens, as they would in a
real tokenizer; anything else falls apart into smaller pieces, down to single bytes."""


@cache
def tiny_tokenizer() -> Tokenizer:
    """The byte-level BPE tokenizer, trained on CORPUS once per process (milliseconds; deterministic)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


def special_token_ids() -> dict[str, int]:
    """The ids of BOS and EOS, for the configs that name them."""
    tokenizer = tiny_tokenizer()
    return {"bos_token_id": tokenizer.token_to_id(BOS), "eos_token_id": tokenizer.token_to_id(EOS)}


def single_tokens(*texts: str) -> list[tuple[int, str]]:
    """(id, text) of each text, which must be one token of the tiny vocabulary: a worker's output, scripted."""
    pairs = []
    for text in texts:
        ids = tiny_tokenizer().encode(text, add_special_tokens=False).ids
        assert len(ids) == 1, f"{text!r} is {len(ids)} tokens of the tiny tokenizer, not one"
        pairs.append((ids[0], text))
    return pairs


def write_tokenizer_files(folder: Path) -> Path:
    """Write the tokenizer's files into `folder` as transformers saves SmolLM2's: tokenizer.json,
    tokenizer_config.json (special tokens) and chat_template.jinja."""
    folder.mkdir(parents=True, exist_ok=True)
    tiny_tokenizer().save(str(folder / "tokenizer.json"))
    config = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": SPECIAL_TOKENS[0],
              "model_max_length": CONTEXT_LENGTH}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return folder


def make_tokenizer_folder(folder: Path) -> Path:
    """A model folder with only the tokenizer: its files and the config.json the API reads with them
    (vocabulary size, context length, EOS). Enough for the API, which never loads the weights."""
    write_tokenizer_files(folder)
    config = {"vocab_size": tiny_tokenizer().get_vocab_size(),
              "max_position_embeddings": CONTEXT_LENGTH, **special_token_ids()}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder
