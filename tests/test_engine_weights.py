"""The weights command, loading errors, INT8 layers and SmoothQuant, on the tiny model and synthetic tensors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from shared.exceptions import ModelFilesMissing
from shared.model_files import require_model_dir
from shared.tokenizer import TextTokenizer
from tests.engine_helpers import REAL_WEIGHTS
from tests.tiny_model import make_tiny_checkpoint
from workers.cpu.decoder import INT8Decoder
from workers.engine.int8 import gemm
from workers.engine.int8.linear import ACTIVATION_LEVELS, Int8Linear
from workers.engine.kv_cache import KVCache
from workers.engine.llama import LlamaConfig, build_model
from workers.engine.weights import fuse_projections, load_state_dict
from workers.gpu.decoder import CUDADecoder
from workers.preparation import command
from workers.preparation.quantize import quantize_state_dict, quantize_weight
from workers.preparation.smoothing import activation_maxima, smooth_state_dict

pytest_plugins = ["tests.engine_fixtures"]
pytestmark = pytest.mark.usefixtures("one_thread")

LOADERS = {
    "require_model_dir": require_model_dir,
    "tokenizer": TextTokenizer,
    "state dict": load_state_dict,
    "fp32 decoder": lambda folder: CUDADecoder(device="cpu").load_weights(folder),
    "int8 decoder": lambda folder: INT8Decoder().load_quantized_weights(folder),
}


def forbid_work(monkeypatch) -> None:
    """Make every step that builds weights fail, so a test proves none of them ran."""
    def fail(*args, **kwargs):
        raise AssertionError("the weights command did work although the folder was prepared")

    for name in ("export_gguf", "copy_checkpoint", "write_int8"):
        monkeypatch.setattr(command, name, fail)


def snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


# -- the weights command ---------------------------------------------------------------------------------


def test_prepare_writes_fp32_and_int8_folders_from_a_hugging_face_checkpoint(tiny_dir):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "prepared.json",
                 "int8/config.json", "int8/model.safetensors", "int8/quantization.json"):
        assert (tiny_dir / name).is_file(), name
    config = json.loads((tiny_dir / "config.json").read_text())
    with safe_open(str(tiny_dir / "int8" / "model.safetensors"), "pt") as tensors:
        names = set(tensors.keys())
        linear = {n.removesuffix("_int8") for n in names if n.endswith("_int8")}
        assert len(linear) == 7 * config["num_hidden_layers"] + 1  # q k v o gate up down per layer, LM head
        assert "lm_head.weight" in linear  # tied in the checkpoint, quantized on its own
        assert all(tensors.get_tensor(f"{n}_int8").dtype == torch.int8 for n in linear)
        assert all(f"{n}_scale" in names and n not in names for n in linear)
        assert all(f"{n}_int8_residual" in names and f"{n}_scale_residual" in names for n in linear)


def test_second_run_says_already_prepared_and_does_no_work(tiny_dir, monkeypatch, capsys):
    source = json.loads((tiny_dir / "prepared.json").read_text())["source"]
    before = snapshot(tiny_dir)
    forbid_work(monkeypatch)
    assert command.prepare(Path(source), tiny_dir) is False
    command.main(["--source", source, "--out", str(tiny_dir)])
    assert capsys.readouterr().out.count("already prepared") == 2
    assert snapshot(tiny_dir) == before


@pytest.mark.model
def test_the_default_command_on_the_prepared_smollm2_does_no_work(monkeypatch, capsys):
    before = snapshot(REAL_WEIGHTS)
    forbid_work(monkeypatch)
    command.main(["--out", str(REAL_WEIGHTS)])
    assert "already prepared" in capsys.readouterr().out
    assert snapshot(REAL_WEIGHTS) == before


def test_int8_weights_from_an_older_weights_command_are_refused_by_name(tiny_dir, tmp_path):
    old = tmp_path / "int8"
    old.mkdir()
    (old / "config.json").write_text((tiny_dir / "int8" / "config.json").read_text())
    state = load_state_dict(tiny_dir / "int8")
    save_file({k: v for k, v in state.items() if "_residual" not in k}, str(old / "model.safetensors"))
    with pytest.raises(ModelFilesMissing, match="current format.*workers.preparation"):
        INT8Decoder().load_quantized_weights(old)


def test_a_failed_run_leaves_no_half_made_folder(tmp_path, monkeypatch):
    source = make_tiny_checkpoint(tmp_path / "checkpoint")
    out = tmp_path / "site" / "weights"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(command, "write_int8", interrupted)
    with pytest.raises(KeyboardInterrupt):
        command.prepare(source, out)
    assert list(out.parent.iterdir()) == []


def test_an_existing_folder_it_did_not_make_is_never_replaced(tmp_path):
    source = make_tiny_checkpoint(tmp_path / "checkpoint")
    mistaken = tmp_path / "home"
    mistaken.mkdir()
    (mistaken / "notes.txt").write_text("precious")
    with pytest.raises(SystemExit, match="not made by this command"):
        command.prepare(source, mistaken)
    assert (mistaken / "notes.txt").read_text() == "precious"


def test_a_folder_that_is_not_a_checkpoint_is_refused_by_name(tmp_path):
    source = tmp_path / "not-a-model"
    source.mkdir()
    (source / "README.md").write_text("nothing here")
    with pytest.raises(SystemExit, match="not-a-model.*config.json"):
        command.prepare(source, tmp_path / "weights")
    assert not (tmp_path / "weights").exists()


def test_a_checkpoint_with_bias_terms_is_refused_up_front(tmp_path):
    source = make_tiny_checkpoint(tmp_path / "biased", attention_bias=True)
    with pytest.raises(SystemExit, match="bias terms"):
        command.prepare(source, tmp_path / "weights")
    assert not (tmp_path / "weights").exists()


@pytest.mark.parametrize("loader", LOADERS)
def test_a_missing_weights_folder_names_the_folder_and_the_command(loader, tmp_path):
    missing = tmp_path / "no-weights-here"
    with pytest.raises(ModelFilesMissing) as error:
        LOADERS[loader](missing)
    assert str(missing.resolve()) in str(error.value)
    assert "python -m workers.preparation" in str(error.value)


def test_a_missing_int8_folder_is_named(tiny_dir, tmp_path):
    fp32_only = tmp_path / "weights"
    fp32_only.mkdir()
    (fp32_only / "config.json").write_text((tiny_dir / "config.json").read_text())
    with pytest.raises(ModelFilesMissing, match="weights/int8"):
        INT8Decoder().load_quantized_weights(fp32_only / "int8")


# -- INT8 layers -----------------------------------------------------------------------------------------


def int8_linear(weight: torch.Tensor) -> Int8Linear:
    layer = Int8Linear(weight.shape[1], weight.shape[0])
    layer.weight_int8, layer.weight_scale = quantize_weight(weight)
    layer.pack()
    return layer


@pytest.fixture(scope="module")
def weight() -> torch.Tensor:
    return torch.randn(384, 256, generator=torch.Generator().manual_seed(0)) * 0.05


def test_quantized_weights_round_to_the_nearest_of_127_levels(weight):
    quantized, scale = quantize_weight(weight)
    assert quantized.dtype == torch.int8 and quantized.abs().max() == 127
    torch.testing.assert_close(scale, weight.abs().amax(dim=1) / 127)
    assert ((quantized.float() * scale[:, None] - weight).abs() <= scale[:, None] / 2 + 1e-7).all()


def test_int8_linear_rows_do_not_depend_on_their_batch(weight):
    layer = int8_linear(weight)
    x = torch.randn(9, 256, generator=torch.Generator().manual_seed(1))
    x[4] *= 100  # an outlier row must not change any other row's result
    together = layer(x)
    for row in range(9):
        assert torch.equal(layer(x[row: row + 1]), together[row: row + 1])
    assert torch.equal(layer(x.view(3, 3, 256)), together.view(3, 3, -1))


def test_int8_linear_error_against_the_fp32_matmul(weight):
    layer = int8_linear(weight)
    x = torch.randn(32, 256, generator=torch.Generator().manual_seed(2))
    exact = x @ weight.T
    error = (layer(x) - exact).norm(dim=-1) / exact.norm(dim=-1)
    # Activation codes dominate: about 1/(levels * 3) of a Gaussian row's scale (levels 127 or 63 by CPU).
    assert error.max() < 2.0 / ACTIVATION_LEVELS


def residual_int8_linear(weight: torch.Tensor) -> Int8Linear:
    layer = Int8Linear(weight.shape[1], weight.shape[0])
    state = quantize_state_dict({"up_proj.weight": weight}, tie_word_embeddings=False)
    layer.weight_int8, layer.weight_scale = state["up_proj.weight_int8"], state["up_proj.weight_scale"]
    layer.weight_int8_residual = state["up_proj.weight_int8_residual"]
    layer.weight_scale_residual = state["up_proj.weight_scale_residual"]
    layer.pack(residual=True)
    return layer


def test_two_pass_int8_linear_is_about_16_bit_accurate(weight):
    x = torch.randn(32, 256, generator=torch.Generator().manual_seed(2))
    exact = x @ weight.T

    def error(layer):
        return ((layer(x) - exact).norm(dim=-1) / exact.norm(dim=-1)).max()

    assert error(residual_int8_linear(weight)) < 1e-3
    assert error(residual_int8_linear(weight)) < error(int8_linear(weight)) / 20


def test_two_pass_int8_linear_rows_do_not_depend_on_their_batch(weight):
    layer = residual_int8_linear(weight)
    x = torch.randn(9, 256, generator=torch.Generator().manual_seed(1))
    x[4] *= 100
    together = layer(x)
    for row in range(9):
        assert torch.equal(layer(x[row: row + 1]), together[row: row + 1])
    assert torch.equal(layer(x.view(3, 3, 256)), together.view(3, 3, -1))


def test_int8_linear_is_exact_at_full_scale():
    # The codes this CPU gets must not saturate its multiply-add: a row at its maximum against weights at
    # theirs is the worst case (16-bit pair sums overflow with 8-bit codes and no VNNI).
    weight = torch.ones(2, 512)
    weight[1] = -1
    x = torch.ones(3, 512)
    x[1] = -1
    result = int8_linear(weight)(x)
    torch.testing.assert_close(result, x @ weight.T, rtol=1e-4, atol=1e-3)


def test_int8_gemm_runs_as_a_cpp_op_here():
    # This machine has a compiler: a silent fall back to the Python kernel would slow every decode step
    # (BENCHMARKS.md, "Targets, as measured above").
    assert gemm.NATIVE


@pytest.mark.slow
def test_without_a_compiler_the_python_kernel_gives_the_same_results(tmp_path, weight):
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(3))
    torch.save({"weight": weight, "x": x}, tmp_path / "inputs.pt")
    script = textwrap.dedent(f"""
        import torch
        from workers.engine.int8 import gemm
        from workers.engine.int8.linear import Int8Linear
        from workers.preparation.quantize import quantize_weight
        assert not gemm.NATIVE, "the C++ op was built although the compiler fails"
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        layer = Int8Linear(256, inputs["weight"].shape[0])
        layer.weight_int8, layer.weight_scale = quantize_weight(inputs["weight"])
        layer.pack()
        torch.save(layer(inputs["x"]), {str(tmp_path / "result.pt")!r})
    """)
    # A compiler that always fails and an empty extension cache: the build must fail and be survived.
    env = {**os.environ, "CXX": "false", "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions")}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "could not build the C++ INT8 GEMM op" in run.stderr
    assert torch.equal(torch.load(tmp_path / "result.pt"), int8_linear(weight)(x))


# -- SmoothQuant -----------------------------------------------------------------------------------------


def test_smoothing_leaves_the_fp32_model_unchanged(tiny_dir, tiny_tokenizer):
    config = LlamaConfig.from_dict(json.loads((tiny_dir / "config.json").read_text()))
    state = load_state_dict(tiny_dir)
    ids = tiny_tokenizer.encode("Calibrate on this sentence, then check another one: the sky is blue today.")
    smoothed = smooth_state_dict(config, state, activation_maxima(config, state, [ids[:10]]))

    def logits(weights):
        model = build_model(config, fuse_projections(dict(weights)))
        cache = KVCache(num_layers=config.num_layers, max_slots=1, num_kv_heads=config.num_kv_heads,
                        head_dim=config.head_dim, max_len=64, dtype=torch.float32, device="cpu")
        return model(torch.tensor([ids]), cache, slice(0, 1), [0], last_only=False)

    assert any(not torch.equal(smoothed[k], v) for k, v in state.items() if k in smoothed)
    torch.testing.assert_close(logits(smoothed), logits(state), rtol=1e-4, atol=1e-4)
