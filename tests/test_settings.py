"""Settings read from the environment: typed, validated, and wrong values named."""

from __future__ import annotations

import pytest

from shared.exceptions import ConfigurationError
from shared.settings import Settings


@pytest.mark.parametrize(("raw", "expected"), [("0", False), ("false", False), ("Off", False), ("1", True),
                                               ("true", True), ("YES", True)])
def test_switches_read_the_usual_spellings(raw, expected):
    assert Settings.from_env({"COMPILE_DECODE": raw}).compile_decode is expected


def test_compiling_the_decode_step_is_the_default():
    assert Settings.from_env({}).compile_decode is True


@pytest.mark.parametrize(("name", "raw"), [("COMPILE_DECODE", "maybe"), ("MAX_BATCH_SIZE", "many"),
                                           ("MAX_BATCH_SIZE", "0"), ("BACKEND_MODE", "tpu"),
                                           ("WORKER_DTYPE", "bf16"), ("WORKER_DTYPE", "int8"),
                                           ("WORKER_DEVICE", "gpu"), ("WORKER_DEVICE", "cuda:"),
                                           ("WORKER_DEVICE", "cuda:one"), ("WORKER_DEVICE", "cuda,1")])
def test_a_bad_value_names_its_variable(name, raw):
    with pytest.raises(ConfigurationError, match=name):
        Settings.from_env({name: raw})


@pytest.mark.parametrize("raw", ["cpu", "cuda", "cuda:0", "cuda:3"])
def test_a_gpu_worker_names_its_device(raw):
    assert Settings.from_env({"WORKER_DEVICE": raw}).worker_device == raw


@pytest.mark.parametrize("raw", ["auto", "bfloat16", "float16", "float32"])
def test_a_gpu_worker_takes_each_documented_dtype(raw):
    assert Settings.from_env({"WORKER_DTYPE": raw}).worker_dtype == raw
