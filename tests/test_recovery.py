"""Recovering the jobs of a worker that died: requeued to resume while recoveries are left, then failed."""

from __future__ import annotations

import fakeredis
import pytest
from rq import Queue, SimpleWorker
from rq.job import JobStatus
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from api.jobs.routing import submit
from shared.events import read_backlog
from shared.lanes import Lane
from shared.protocol import GenerationJob
from shared.recovery import recover_abandoned
from shared.sampling import SamplingParams
from shared.settings import Settings
from tests.fixtures_jobs import ensure_live_worker

SETTINGS = Settings(max_recoveries=1)


@pytest.fixture
def connection():
    connection = fakeredis.FakeRedis()
    ensure_live_worker(connection)  # the pool the jobs are submitted to
    return connection


def start_on_a_worker_that_then_dies(connection, job_id: str) -> None:
    """Take the job as a worker does, then let its heartbeat lapse (the worker stopped beating)."""
    queue = Queue("cpu", connection=connection, serializer=JSONSerializer)
    worker = SimpleWorker([queue], connection=connection, serializer=JSONSerializer)
    worker.register_birth()
    job, _ = Queue.dequeue_any([queue], None, connection=connection, serializer=JSONSerializer)
    assert job.id == job_id
    worker.prepare_execution(job)
    worker.prepare_job_execution(job)
    registry = StartedJobRegistry("cpu", connection=connection)
    for member in connection.zrange(registry.key, 0, -1):
        connection.zadd(registry.key, {member: 1})  # its heartbeat ran out long ago


def submit_abc(connection) -> None:
    """Enqueue job `abc` as the API does."""
    submit(connection, [GenerationJob(job_id="abc", prompt_ids=[1], sampling=SamplingParams())], Lane.INTERACTIVE,
           SETTINGS)


def test_a_dead_workers_job_is_requeued_then_failed_with_an_error_event(connection):
    job = GenerationJob(job_id="abc", prompt_ids=[1, 2], sampling=SamplingParams(), backend="cpu")
    submit(connection, [job], Lane.INTERACTIVE, SETTINGS)
    queue = Queue("cpu", connection=connection, serializer=JSONSerializer)

    start_on_a_worker_that_then_dies(connection, "abc")
    recover_abandoned(connection, "cpu", SETTINGS)
    assert queue.fetch_job("abc").get_status() == JobStatus.QUEUED and queue.job_ids == ["abc"]
    assert read_backlog(connection, "abc") == []  # nothing to tell the client: the job goes on elsewhere

    start_on_a_worker_that_then_dies(connection, "abc")  # its second worker dies too: out of recoveries
    recover_abandoned(connection, "cpu", SETTINGS)
    assert queue.fetch_job("abc").get_status() == JobStatus.FAILED
    assert "abc" in FailedJobRegistry("cpu", connection=connection).get_job_ids()
    error = read_backlog(connection, "abc")[-1]
    assert error.type == "error" and error.data["error"]["type"] == "job_lost"
    assert "MAX_RECOVERIES is 1" in error.data["error"]["message"]


def test_a_live_workers_job_is_left_alone(connection):
    submit_abc(connection)
    queue = Queue("cpu", connection=connection, serializer=JSONSerializer)
    worker = SimpleWorker([queue], connection=connection, serializer=JSONSerializer)
    job, _ = Queue.dequeue_any([queue], None, connection=connection, serializer=JSONSerializer)
    worker.prepare_execution(job)
    worker.prepare_job_execution(job)
    recover_abandoned(connection, "cpu", SETTINGS)
    assert queue.fetch_job("abc").get_status() == JobStatus.STARTED


def test_one_process_recovers_a_pool_at_a_time(connection):
    connection.set("llm:recovery:cpu", "1")  # another process is at it
    submit_abc(connection)
    start_on_a_worker_that_then_dies(connection, "abc")
    recover_abandoned(connection, "cpu", SETTINGS)
    assert Queue("cpu", connection=connection).fetch_job("abc").get_status() == JobStatus.STARTED


def test_a_resumed_job_can_be_cancelled_once_its_dead_execution_has_expired(connection):
    submit_abc(connection)
    start_on_a_worker_that_then_dies(connection, "abc")
    for key in connection.scan_iter("rq:execution:*"):
        connection.delete(key)  # the dead worker's execution expired (RQ lists its id 60 s longer)
    recover_abandoned(connection, "cpu", SETTINGS)
    queue = Queue("cpu", connection=connection, serializer=JSONSerializer)
    worker = SimpleWorker([queue], connection=connection, serializer=JSONSerializer)
    job, _ = Queue.dequeue_any([queue], None, connection=connection, serializer=JSONSerializer)
    execution = worker.prepare_execution(job)  # another worker resumes it
    worker.prepare_job_execution(job)
    with connection.pipeline() as pipeline:  # then its client cancels it: what BatchingWorker.cancel does
        worker.cleanup_execution(job, pipeline=pipeline, execution=execution)
        pipeline.execute()
    job.cancel()
    assert job.get_status() == JobStatus.CANCELED
