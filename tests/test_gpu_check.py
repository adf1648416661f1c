"""`python -m bench.gpu_check`: without CUDA it says so and passes; `--cpu` runs its steps on the CPU (the dry run
that keeps the script working where no GPU is); on a GPU (marker `gpu`) the whole check passes."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from bench import common, gpu_check, gpu_steps
from tests.engine_helpers import ROOT


def test_without_cuda_it_says_skipped_and_exits_0(capsys):
    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    assert gpu_check.main([]) == 0
    assert "gpu_check skipped: no CUDA" in capsys.readouterr().out


def test_the_dry_run_runs_every_step_on_the_tiny_model(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "no-model"))  # the tiny model only
    monkeypatch.setattr(common, "BENCHMARKS", tmp_path / "BENCHMARKS.md")
    assert gpu_check.main(["--cpu", "--skip", "worker", "--write"]) == 0
    written = (tmp_path / "BENCHMARKS.md").read_text()
    assert "## GPU check (CPU (dry run))" in written and "[ok] precision" in written
    out = capsys.readouterr().out
    for step in set(gpu_check.STEPS) - {"worker"}:
        assert f"[ok] {step}" in out, out
    assert "[skip] worker" in out and "gpu_check: 7 ok, 0 failed" in out
    assert "decode step 32x512 (graph bucket): torch picks" in out
    assert "tiny: top-1 agreement" in out and "batch   2: ours" in out


def test_a_failing_step_is_reported_and_fails_the_check(monkeypatch, tmp_path, capsys):
    def broken(target):
        raise gpu_steps.CheckFailed("the KV cache takes 1 bytes, not the 2 its size implies")

    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "no-model"))
    monkeypatch.setitem(gpu_check.STEPS, "memory", broken)
    assert gpu_check.main(["--cpu", "--skip", "throughput", "features", "worker"]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] memory" in out and "the KV cache takes 1 bytes" in out
    assert "[ok] precision" in out and "gpu_check: 4 ok, 1 failed (memory)" in out


@pytest.mark.integration
def test_the_dry_runs_worker_step_serves_a_job_through_rq_worker_gpu(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "no-model"))
    skipped = [step for step in gpu_check.STEPS if step != "worker"]
    assert gpu_check.main(["--cpu", "--skip", *skipped]) == 0
    assert "[ok] worker" in capsys.readouterr().out


@pytest.mark.gpu
def test_the_gpu_check_passes_on_this_gpu():
    run = subprocess.run([sys.executable, "-m", "bench.gpu_check"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
