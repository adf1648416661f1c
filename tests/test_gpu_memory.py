"""Memory of the GPU decoder, on the CPU: a KV cache the size MAX_TOKENS_IN_FLIGHT says (or what the GPU's free
memory holds), blocks lent and returned as sequences come and go, and weights fused without a second copy."""

from __future__ import annotations

import gc
import logging
import math
import random
import weakref

import pytest
import torch

from shared.sampling import SamplingParams
from tests.engine_helpers import greedy_alone, load_fp32, run_engine, tiny_prompts
from workers.engine.engine import Engine
from workers.engine.weights import fuse_projections, load_state_dict
from workers.gpu import device as gpu_device
from workers.gpu.decoder import CUDADecoder
from workers.gpu.paged_cache import BLOCK

pytest_plugins = ["tests.engine_fixtures"]
pytestmark = pytest.mark.usefixtures("one_thread")


def bytes_per_position(decoder: CUDADecoder) -> int:
    config = decoder.config
    return config.num_layers * 2 * config.num_kv_heads * config.head_dim * decoder.dtype.itemsize


def test_the_kv_cache_holds_max_tokens_in_flight_not_every_slot_at_full_length(tiny_dir, tiny_tokenizer):
    decoder = CUDADecoder(device="cpu", max_batch_size=8, max_seq_len=256, max_tokens_in_flight=200)
    decoder.load_weights(tiny_dir)
    blocks = 1 + math.ceil(200 / BLOCK) + 8  # the budget, a part-empty block per slot, and the trash block
    assert decoder.cache.nbytes == blocks * BLOCK * bytes_per_position(decoder)
    assert decoder.cache.nbytes < 8 * 256 * bytes_per_position(decoder) / 2
    engine = Engine(decoder, tiny_tokenizer.backend, tiny_tokenizer.eos_token_ids, max_tokens_in_flight=32768)
    assert engine.max_tokens_in_flight == 200  # the cache, not a larger setting, bounds what is reserved
    with pytest.raises(ValueError, match="201 KV positions.*200"):
        engine.check_fits(100, 101)


def test_a_cache_shorter_than_the_context_is_logged(tiny_dir, caplog):
    CUDADecoder(device="cpu", max_batch_size=2, max_seq_len=256, max_tokens_in_flight=100).load_weights(tiny_dir)
    assert "holds 100 positions, fewer than MAX_SEQ_LEN=256" in caplog.text


def test_a_gpu_worker_sizes_its_cache_by_free_memory_and_logs_it(tiny_dir, monkeypatch, caplog):
    from shared.model_files import read_config
    from workers.engine.llama import LlamaConfig

    config = LlamaConfig.from_dict(read_config(tiny_dir))
    per_position = gpu_device.kv_bytes_per_position(config, torch.bfloat16)
    free = 1000 * per_position
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Test GPU")
    caplog.set_level(logging.INFO, logger=gpu_device.__name__)
    cuda = torch.device("cuda", 1)
    assert gpu_device.kv_positions(config, torch.bfloat16, cuda, budget=500) == 500
    assert "KV cache: 500 positions" in caplog.text and "MAX_TOKENS_IN_FLIGHT)" in caplog.text
    fits = int(free * gpu_device.GPU_MEMORY_SHARE) // per_position
    assert gpu_device.kv_positions(config, torch.bfloat16, cuda, budget=32768) == fits < 1000
    assert f"KV cache: {fits} positions" in caplog.text and "MAX_TOKENS_IN_FLIGHT=32768 does not" in caplog.text
    assert "Test GPU" in caplog.text and "free of 80.00 GiB" in caplog.text


def test_blocks_return_to_the_pool_as_sequences_leave_and_outputs_stay_the_same(tiny_dir, tiny_tokenizer):
    # A tight budget: sequences of every length come and go, wait for room, and are compacted; the pool never
    # runs dry and no sequence sees another's keys (each gives what it gives alone).
    decoder = CUDADecoder(device="cpu", max_batch_size=4, max_seq_len=256, max_tokens_in_flight=160)
    decoder.load_weights(tiny_dir)
    rng = random.Random(0)
    prompts = [tiny_tokenizer.encode(" ".join(["word"] * rng.randint(1, 40))) for _ in range(10)]
    prompts = [ids[: rng.randint(1, len(ids))] for ids in prompts]
    lengths = [rng.randint(2, 24) for _ in prompts]
    params = [SamplingParams(max_tokens=n, temperature=0.0) for n in lengths]
    most = 0

    def watch(engine, step):
        nonlocal most
        most = max(most, decoder.cache.blocks_in_use)

    results = run_engine(decoder, tiny_tokenizer, prompts, params, eos_token_ids=[], prefill_chunk=16,
                         after_step=watch)
    alone = load_fp32(tiny_dir)
    assert [r.ids for r in results] == [greedy_alone(alone, tiny_tokenizer, [p], n, eos_token_ids=[])[0]
                                        for p, n in zip(prompts, lengths)]
    assert 0 < most <= math.ceil(160 / BLOCK) + 4


def test_a_slot_copy_gives_the_target_the_sources_keys(tiny_dir, tiny_tokenizer):
    decoder = load_fp32(tiny_dir)
    prompt = tiny_prompts(tiny_tokenizer)[0]
    first = decoder.prefill(0, prompt)
    decoder.cache.copy_slot(0, 1, len(prompt))
    keys = [decoder.cache.read(layer, slice(0, 2), len(prompt))[0] for layer in range(decoder.config.num_layers)]
    assert all(torch.equal(k[0], k[1]) for k in keys)
    next_token = int(first.argmax())
    both = decoder.decode([next_token, next_token], [len(prompt)] * 2)  # each slot on from its own keys
    torch.testing.assert_close(both[0], both[1])


def test_fusing_releases_each_layers_unfused_weights(tiny_dir):
    state = load_state_dict(tiny_dir, "cpu", torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    parts = [name for name in state if any(f".{p}_proj." in name for p in ("q", "k", "v", "gate", "up"))]
    watched = [weakref.ref(state[name]) for name in parts]
    fused = fuse_projections(state)
    gc.collect()
    assert fused is state and not any(name in fused for name in parts)
    assert all(ref() is None for ref in watched)  # no second copy of the projections is left anywhere
