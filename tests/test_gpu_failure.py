"""A GPU worker whose device breaks exits non-zero for its supervisor to restart it, and its jobs resume on
another worker; what is a device failure and what is not.

The worker is a real `GPUWorker` in-process (WORKER_DEVICE=cpu, the tiny model) against the real Redis of
TEST_REDIS_URL, with a CUDA error planted in its decode step and `os._exit` caught (it would end pytest).
"""

from __future__ import annotations

import os
import time

import pytest
import redis
import torch
from rq import Queue, Worker
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from shared.events import read_backlog
from shared.protocol import JOB_FUNCTION, GenerationJob
from shared.recovery import recover_abandoned, retry_policy
from shared.sampling import SamplingParams
from shared.settings import Settings
from shared.tokenizer import load_tokenizer
from tests.broken_device import BREAKS_AT_DECODE, CUDA_FAULT
from tests.service_fixtures import (
    Service,
    free_port,
    own_redis_server,
    private_queue,
    procfile_commands,
    tiny_environment,
)
from workers.engine.device_failure import DEVICE_FAILURE_EXIT, is_device_failure
from workers.gpu import GPUWorker
from workers.gpu.decoder import CUDADecoder

pytest_plugins = ["tests.engine_fixtures"]
pytestmark = pytest.mark.usefixtures("one_thread")

BROKEN_GPU = procfile_commands()["gpu"].replace("workers.gpu.GPUWorker", "tests.broken_device.BrokenDeviceGPUWorker")
"""The Procfile's `gpu` line with the worker whose device breaks mid-batch."""

WAIT_S = 120
"""The longest a process may take to start, fail or answer here (a busy two-core machine)."""


@pytest.mark.parametrize(("error", "broken"), [
    (RuntimeError(CUDA_FAULT), True),
    (RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx( handle, opa, opb, ...)`"), True),
    (torch.AcceleratorError("device-side assert triggered"), True),
    (ValueError("a bad request"), False),
    (RuntimeError("shape '[2, 3]' is invalid for input of size 5"), False),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), False),  # the context survives
    (KeyError("CUDA"), False),
])
def test_which_errors_mean_the_device_broke(error, broken):
    assert is_device_failure(error) is broken
    try:
        raise ValueError("while sampling") from error
    except ValueError as wrapped:
        assert is_device_failure(wrapped) is broken


class Exited(BaseException):
    """What the patched `os._exit` raises: the status the worker exited with."""


@pytest.fixture
def pool():
    """A queue name of the test's own on the real Redis; every key naming it is deleted afterwards."""
    with private_queue("gpu-failure") as queue:
        yield queue


def run_worker(connection, name: str, settings: Settings, worker_name: str) -> GPUWorker:
    worker = GPUWorker([Queue(name, connection=connection, serializer=JSONSerializer)], connection=connection,
                       settings=settings, name=worker_name)
    worker.work(burst=True)
    return worker


def test_a_cuda_error_exits_the_worker_and_its_job_resumes_elsewhere(pool, tiny_weights, monkeypatch):
    connection, name = pool
    settings = Settings.from_env({}, model_dir=str(tiny_weights), worker_device="cpu", max_seq_len=256,
                                 worker_dead_s=2, max_recoveries=1)
    ids = load_tokenizer(str(tiny_weights)).encode("The history of the Roman Empire")
    job_id = f"{name}-job"
    job = GenerationJob(job_id=job_id, prompt_ids=ids, sampling=SamplingParams(max_tokens=12, temperature=0))
    Queue(name, connection=connection, serializer=JSONSerializer).enqueue(
        JOB_FUNCTION, kwargs={"payload": job.model_dump(mode="json")}, job_id=job_id, job_timeout=60,
        retry=retry_policy(settings))

    decode, calls = CUDADecoder.decode, {"count": 0}

    def decode_breaking(self, tokens, positions):
        calls["count"] += 1
        if calls["count"] == 5:
            raise RuntimeError(CUDA_FAULT)
        return decode(self, tokens, positions)

    statuses = []

    def exit_process(status):
        statuses.append(status)
        raise Exited(status)  # RQ's loop swallows it; a real os._exit never returns

    monkeypatch.setattr(CUDADecoder, "decode", decode_breaking)
    monkeypatch.setattr(os, "_exit", exit_process)
    run_worker(connection, name, settings, f"{name}-broken")
    assert statuses == [DEVICE_FAILURE_EXIT]

    sent = read_backlog(connection, job_id)
    assert [e.type for e in sent] == ["token"] * 5  # its tokens so far, and no error: the job is not failed
    assert job_id in StartedJobRegistry(name, connection=connection).get_job_ids()
    assert f"{name}-broken" not in [w.name for w in Worker.all(connection=connection)]  # counted dead at once

    # Its heartbeat lapses within WORKER_DEAD_S; recovery (any live worker's, here the test's) requeues it.
    deadline = time.monotonic() + 20
    while job_id not in Queue(name, connection=connection).get_job_ids():
        assert time.monotonic() < deadline, "the job was never recovered"
        recover_abandoned(connection, name, settings)
        time.sleep(0.2)
    monkeypatch.setattr(CUDADecoder, "decode", decode)
    run_worker(connection, name, settings, f"{name}-healthy")

    events = read_backlog(connection, job_id)
    tokens = [e.data for e in events if e.type == "token"]
    assert [t["index"] for t in tokens] == list(range(len(tokens)))  # no gap, no repeat across the two workers
    assert events[-1].type == "done" and events[-1].data["output_ids"] == [t["token"] for t in tokens]
    uninterrupted = greedy_ids(tiny_weights, ids, 12)
    assert events[-1].data["output_ids"] == uninterrupted


def greedy_ids(weights, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """What the job gives on a worker that never fails."""
    from shared.tokenizer import TextTokenizer
    from tests.engine_helpers import greedy, load_fp32

    return greedy(load_fp32(weights), TextTokenizer(weights), [prompt_ids], max_tokens)[0]


def enqueue(connection, job_id: str, prompt_ids: list[int], settings: Settings) -> None:
    """A generation job on the `gpu` queue, with the recoveries the API gives every job."""
    job = GenerationJob(job_id=job_id, prompt_ids=prompt_ids, sampling=SamplingParams(max_tokens=12, temperature=0))
    Queue("gpu", connection=connection, serializer=JSONSerializer).enqueue(
        JOB_FUNCTION, kwargs={"payload": job.model_dump(mode="json")}, job_id=job_id, job_timeout=120,
        retry=retry_policy(settings))


@pytest.mark.integration
@pytest.mark.slow
def test_a_worker_process_whose_device_breaks_exits_69_and_a_fresh_one_finishes_its_job(tiny_weights):
    ids = load_tokenizer(str(tiny_weights)).encode("The history of the Roman Empire")
    with own_redis_server() as server:
        connection = redis.Redis.from_url(server.url)
        env = tiny_environment(free_port(), server.url, tiny_weights, WORKER_DEVICE="cpu", WORKER_DEAD_S="2")
        service = Service("", connection, {}, {})
        try:
            enqueue(connection, "job-1", ids, Settings.from_env({}))
            broken = service.start("gpu", env, name="gpu-broken-device", command=BROKEN_GPU)
            assert broken.wait(timeout=WAIT_S) == DEVICE_FAILURE_EXIT
            sent = read_backlog(connection, "job-1")
            assert [e.type for e in sent] == ["token"] * BREAKS_AT_DECODE  # the prefill's token, then 2 decodes
            assert CUDA_FAULT in service.logs["gpu-broken-device"].read_text()
            fresh = service.start("gpu", env, name="gpu-fresh")  # as its supervisor would: the line, a new process
            deadline = time.monotonic() + WAIT_S
            while read_backlog(connection, "job-1")[-1].type == "token":
                assert fresh.poll() is None, service.logs["gpu-fresh"].read_text()[-3000:]
                assert time.monotonic() < deadline, "the job was not resumed"
                time.sleep(0.2)
        finally:
            service.stop_all()
        events = read_backlog(connection, "job-1")
    tokens = [e.data for e in events if e.type == "token"]
    assert [t["index"] for t in tokens] == list(range(len(tokens)))  # no gap, no repeat across the two processes
    assert events[-1].type == "done" and events[-1].data["output_ids"] == greedy_ids(tiny_weights, ids, 12)
