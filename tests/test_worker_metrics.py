"""A worker's metrics, in-process over fakeredis with the tiny model: every job's tokens and latencies, the
batch after each step, a recovered job, and the snapshot the API's /metrics serves."""

from __future__ import annotations

import uuid

import fakeredis
import pytest
from prometheus_client.parser import text_string_to_metric_families
from rq import Queue
from rq.serializers import JSONSerializer

from api import create_app
from shared.events import EventPublisher, read_backlog
from shared.protocol import JOB_FUNCTION, GenerationJob, TokenEvent
from shared.sampling import SamplingParams
from shared.settings import Settings
from shared.tokenizer import load_tokenizer
from workers.cpu import CPUWorker


@pytest.fixture
def connection():
    return fakeredis.FakeRedis()


def enqueue(connection, weights, prompt: str, **sampling) -> tuple[str, int]:
    """A job as the API enqueues it; its id and prompt length."""
    prompt_ids = load_tokenizer(str(weights)).encode(prompt)
    job = GenerationJob(job_id=uuid.uuid4().hex, prompt_ids=prompt_ids, sampling=SamplingParams(**sampling),
                        backend="cpu")
    Queue("cpu", connection=connection, serializer=JSONSerializer).enqueue(
        JOB_FUNCTION, kwargs={"payload": job.model_dump(mode="json")}, job_id=job.job_id, job_timeout=60,
        meta={"request_id": "req-" + job.job_id[:6]})
    return job.job_id, len(prompt_ids)


def run_worker(connection, weights) -> CPUWorker:
    settings = Settings.from_env({}, model_dir=str(weights), max_seq_len=256, max_tokens_in_flight=2000,
                                  compile_decode=False)
    worker = CPUWorker([Queue("cpu", connection=connection, serializer=JSONSerializer)], connection=connection,
                       settings=settings)
    worker.work(burst=True)
    return worker


def value(worker: CPUWorker, name: str, **labels) -> float:
    return worker.metrics.registry.get_sample_value(name, labels) or 0.0


def test_every_job_s_tokens_and_latencies_are_counted(connection, tiny_weights):
    jobs = [enqueue(connection, tiny_weights, prompt, max_tokens=n, temperature=0)
            for prompt, n in [("Hello there", 5), ("A longer prompt about the sea", 7), ("Hi", 3)]]
    worker = run_worker(connection, tiny_weights)
    tokens = [sum(event.type == "token" for event in read_backlog(connection, job_id)) for job_id, _ in jobs]
    assert value(worker, "llm_generation_tokens_total") == sum(tokens)
    assert value(worker, "llm_prompt_tokens_total") == sum(length for _, length in jobs)
    assert value(worker, "llm_time_to_first_token_seconds_count") == 3
    assert value(worker, "llm_inter_token_latency_seconds_count") == sum(tokens) - 3
    assert value(worker, "llm_e2e_request_latency_seconds_count") == 3
    assert value(worker, "llm_queue_wait_seconds_count") == 3
    finished = sum(value(worker, "llm_jobs_finished_total", reason=reason) for reason in ("eos", "length", "stop"))
    assert finished == 3
    assert value(worker, "llm_worker_step_duration_seconds_count") >= max(tokens) - 1  # a prefill step samples too
    assert value(worker, "llm_worker_batch_size") == 0 and value(worker, "llm_worker_kv_positions_used") == 0
    assert value(worker, "llm_worker_kv_positions_limit") == 2000
    assert value(worker, "llm_worker_jobs_recovered_total") == 0


def test_a_recovered_job_counts_as_recovered_and_not_again_as_a_first_token(connection, tiny_weights):
    job_id, _ = enqueue(connection, tiny_weights, "Hello there", max_tokens=6, temperature=0)
    EventPublisher(connection, job_id, 60).publish(TokenEvent(token=5, text="x", index=0))  # a dead worker's
    worker = run_worker(connection, tiny_weights)
    assert value(worker, "llm_worker_jobs_recovered_total") == 1
    assert value(worker, "llm_time_to_first_token_seconds_count") == 0
    assert value(worker, "llm_prompt_tokens_total") == 0
    sent_here = sum(event.type == "token" for event in read_backlog(connection, job_id)) - 1
    assert value(worker, "llm_generation_tokens_total") == sent_here


def test_a_cancelled_job_ends_as_cancelled(connection, tiny_weights):
    from shared.events import cancel_key

    job_id, _ = enqueue(connection, tiny_weights, "Hello there", max_tokens=50, temperature=0)
    connection.set(cancel_key(job_id), "1")
    worker = run_worker(connection, tiny_weights)
    assert value(worker, "llm_jobs_finished_total", reason="cancelled") == 1


def test_the_api_serves_the_worker_s_snapshot(connection, tiny_weights, tiny_tokenizer_dir):
    enqueue(connection, tiny_weights, "Hello there", max_tokens=4, temperature=0)
    worker = run_worker(connection, tiny_weights)
    worker.liveness.push_metrics()  # what its heartbeat does every WORKER_DEAD_S / 4
    app = create_app({"TESTING": True, "REDIS_CLIENT": connection, "MODEL_DIR": str(tiny_tokenizer_dir)})
    text = app.test_client().get("/metrics").get_data(as_text=True)
    samples = {(s.name, s.labels.get("worker")): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("llm_generation_tokens_total", worker.name)] == value(worker, "llm_generation_tokens_total") > 0
    assert samples[("llm_time_to_first_token_seconds_count", worker.name)] == 1
