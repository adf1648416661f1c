"""The GPU decoder on a real CUDA device (marker `gpu`: skipped without one): CUDA graphs against eager decoding,
bf16 against fp32, the sampler's one transfer per step, and a GPU index that does not exist."""

from __future__ import annotations

import pytest
import torch

from bench.gpu_steps import Target, count_syncs
from shared.exceptions import ConfigurationError
from shared.sampling import SamplingParams
from tests.engine_helpers import greedy, tiny_prompts
from workers.engine.sampler import SamplingState, sample
from workers.gpu.decoder import CUDADecoder

pytest_plugins = ["tests.engine_fixtures"]
pytestmark = pytest.mark.gpu


def on_cuda(folder, dtype: str = "float32", **options) -> CUDADecoder:
    options = {"max_batch_size": 8, "max_seq_len": 256, **options}
    return CUDADecoder(device="cuda", dtype=dtype, **options).load_weights(folder)


def test_cuda_graphs_decode_as_the_eager_step_does(tiny_dir, tiny_tokenizer):
    graphs = on_cuda(tiny_dir, compile_decode=True)
    assert graphs.decode_is_compiled
    assert graphs.static.captured == len(graphs.static.batch_sizes) * len(graphs.static.lengths)
    prompts = tiny_prompts(tiny_tokenizer)
    eager = greedy(on_cuda(tiny_dir), tiny_tokenizer, prompts, 24, eos_token_ids=[])
    assert greedy(graphs, tiny_tokenizer, prompts, 24, eos_token_ids=[]) == eager


def test_bf16_on_the_gpu_picks_fp32s_tokens(tiny_dir, tiny_tokenizer):
    prompts = tiny_prompts(tiny_tokenizer)
    fp32 = greedy(on_cuda(tiny_dir), tiny_tokenizer, prompts, 16, eos_token_ids=[])
    bf16 = greedy(on_cuda(tiny_dir, "bfloat16", compile_decode=True), tiny_tokenizer, prompts, 16, eos_token_ids=[])
    first = [a[0] == b[0] for a, b in zip(fp32, bf16)]
    assert sum(first) >= len(first) - 1


def test_sampling_a_batch_waits_for_the_gpu_once():
    target = Target(torch.device("cuda"), torch.bfloat16, {}, (1,), 8, 8, 256, 2048)
    params = [SamplingParams(temperature=0.9, top_k=50, top_p=0.9, seed=row, repetition_penalty=1.1)
              for row in range(8)]
    logits = torch.randn(8, 49152, device="cuda")
    assert count_syncs(target, lambda: sample(logits, [SamplingState(p, [1, 2]) for p in params])) <= 1


def test_a_gpu_index_beyond_the_visible_ones_is_refused():
    with pytest.raises(ConfigurationError, match="WORKER_DEVICE=cuda:.*sees"):
        CUDADecoder(device=f"cuda:{torch.cuda.device_count()}")
