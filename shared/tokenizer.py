"""The model's tokenizer and chat template, loaded once per process from the prepared folder.

Built on the `tokenizers` library and jinja2 rather than transformers, so the API process never imports
torch. Chat templates render as transformers renders them (sandboxed jinja2, trim/lstrip blocks).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from shared.exceptions import ValidationError
from shared.model_files import eos_token_ids, read_config, require_model_dir


def _raise_template_error(message: str):
    raise ValidationError(f"chat template: {message}", field="messages")


class TextTokenizer:
    """Text <-> token ids, chat rendering, and the facts about the model a request is checked against."""

    def __init__(self, folder: Path | str):
        folder = require_model_dir(folder)
        self.backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.vocab_size = read_config(folder)["vocab_size"]
        self.context_length = read_config(folder).get("max_position_embeddings", 2048)
        self.eos_token_ids = eos_token_ids(folder)
        config_file = folder / "tokenizer_config.json"
        tokenizer_config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        template_file = folder / "chat_template.jinja"
        source = template_file.read_text() if template_file.is_file() else tokenizer_config.get("chat_template")
        self.special_tokens = {key: tokenizer_config.get(key) for key in ("bos_token", "eos_token")}
        self._chat_template = None
        if source:
            environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                        extensions=["jinja2.ext.loopcontrols"])
            environment.globals["raise_exception"] = _raise_template_error
            self._chat_template = environment.from_string(source)

    def encode(self, text: str) -> list[int]:
        """Token ids of raw text, with whatever special tokens the tokenizer itself adds (none for SmolLM2)."""
        return self.backend.encode(text, add_special_tokens=True).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of token ids."""
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    @property
    def vocabulary_size(self) -> int:
        """Number of token ids the tokenizer knows (added tokens included): valid ids are [0, size)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_strings(self, ids: list[int]) -> list[str]:
        """The vocabulary entry of each id."""
        return [self.backend.id_to_token(i) for i in ids]

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text the model's own chat template makes of `messages`."""
        if self._chat_template is None:
            raise ValidationError("this model has no chat template", field="messages")
        return self._chat_template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                          **self.special_tokens)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of the chat-templated prompt (the template supplies its own special tokens)."""
        return self.encode_rendered(self.render_chat(messages))

    def encode_rendered(self, prompt: str) -> list[int]:
        """Token ids of a prompt `render_chat` made (no special tokens added: the template has them)."""
        return self.backend.encode(prompt, add_special_tokens=False).ids


@cache
def load_tokenizer(folder: str) -> TextTokenizer:
    """The process-wide tokenizer for a prepared model folder."""
    return TextTokenizer(folder)
