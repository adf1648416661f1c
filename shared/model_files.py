"""Where the prepared model lives, and the switches that keep every library offline."""

from __future__ import annotations

import json
import os
from pathlib import Path

from shared.exceptions import ModelFilesMissing

OFFLINE_ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def force_offline() -> None:
    """Nothing may load from a hub at run time: set the switches before transformers reads them."""
    for key, value in OFFLINE_ENVIRONMENT.items():
        os.environ.setdefault(key, value)


def require_model_dir(path: Path | str) -> Path:
    """The prepared folder, or a clear error naming it and the command that makes it."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelFilesMissing(path.resolve())
    return path


def read_config(path: Path | str) -> dict:
    """The model's config.json as a dict."""
    return json.loads((require_model_dir(path) / "config.json").read_text())


def eos_token_ids(path: Path | str) -> list[int]:
    """Every id that ends generation, from config.json and generation_config.json."""
    path = Path(path)
    ids: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        file = path / name
        if file.is_file():
            value = json.loads(file.read_text()).get("eos_token_id")
            ids.update(value if isinstance(value, list) else [value] if value is not None else [])
    return sorted(ids)


MANIFEST = "prepared.json"
"""Written by the weights command (`python -m workers.preparation`): the source the folder was made from."""


def model_name(path: Path | str) -> str:
    """The served model's name: its source's file or folder name (`.gguf` dropped), else the folder's own."""
    path = Path(path)
    manifest = path / MANIFEST
    source = json.loads(manifest.read_text()).get("source") if manifest.is_file() else None
    name = Path(source).name if source else path.resolve().name
    return name.removesuffix(".gguf")
