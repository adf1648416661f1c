"""Lanes on the worker: interactive work first, batch items on part of the slots, beam and scoring jobs in the
batch without blocking it, the queue deadline, and what a worker tells the API (slots, ended jobs)."""

from __future__ import annotations

import json
import statistics
import uuid
from datetime import timedelta

import fakeredis
import pytest
from rq import Queue
from rq.job import Job
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer
from rq.utils import now

from shared.events import read_backlog
from shared.lanes import ENDINGS_FIELD, LANE_SLOTS_FIELD, Lane, finished_key, queue_name
from shared.protocol import JOB_FUNCTION, BeamOptions, GenerationJob, JobKind
from shared.sampling import SamplingParams
from shared.settings import Settings
from shared.tokenizer import load_tokenizer
from workers.cpu import CPUWorker
from workers.engine.groups import GroupRow


@pytest.fixture
def connection():
    return fakeredis.FakeRedis()


def enqueue(connection, weights, prompt: str, lane: Lane = Lane.INTERACTIVE, kind: JobKind = JobKind.GENERATE,
            deadline_s: float | None = None, **sampling) -> str:
    job_id = uuid.uuid4().hex
    options = {"beam": BeamOptions(beam_width=2, use_rerank=False)} if kind is JobKind.BEAM else {}
    job = GenerationJob(job_id=job_id, prompt_ids=load_tokenizer(str(weights)).encode(prompt),
                        sampling=SamplingParams(**sampling), kind=kind, queue_deadline_s=deadline_s, **options)
    Queue(queue_name("cpu", lane), connection=connection, serializer=JSONSerializer).enqueue(
        JOB_FUNCTION, kwargs={"payload": job.model_dump(mode="json")}, job_id=job_id, job_timeout=60)
    return job_id


def make_worker(connection, weights, worker_class=CPUWorker, **settings) -> CPUWorker:
    settings = Settings.from_env({}, model_dir=str(weights), worker_device="cpu", max_seq_len=256, **settings)
    return worker_class(["cpu"], connection=connection, settings=settings)


def fetch(connection, job_id: str):
    return Job.fetch(job_id, connection=connection, serializer=JSONSerializer)


def most_at_once(jobs) -> int:
    """The most of `jobs` that were running at one time (from RQ's start and end times)."""
    edges = sorted([(job.started_at, 1) for job in jobs] + [(job.ended_at, -1) for job in jobs])
    running = peak = 0
    for _, change in edges:
        running += change
        peak = max(peak, running)
    return peak


def test_rq_worker_cpu_listens_on_every_lane_of_the_pool_and_advertises_its_slots(connection, tiny_weights):
    worker = make_worker(connection, tiny_weights, max_batch_size=8)
    assert worker.queue_names() == ["cpu", "cpu:side", "cpu:batch"]
    worker.engine = worker.load_engine()  # as work() does, before RQ registers the worker
    worker.register_birth()
    slots = json.loads(connection.hget(worker.key, LANE_SLOTS_FIELD))
    assert slots == {"interactive": 8, "side": 2, "batch": 6}


def test_batch_items_hold_only_their_lane_slots_and_interactive_jobs_go_first(connection, tiny_weights):
    batch = [enqueue(connection, tiny_weights, f"Batch prompt {i}", Lane.BATCH, max_tokens=6, temperature=0)
             for i in range(6)]
    interactive = [enqueue(connection, tiny_weights, f"Interactive {i}", max_tokens=6, temperature=0)
                   for i in range(3)]
    make_worker(connection, tiny_weights, max_batch_size=4, batch_lane_slots=2).work(burst=True)
    batch_jobs, interactive_jobs = ([fetch(connection, i) for i in ids] for ids in (batch, interactive))
    assert all(read_backlog(connection, job_id)[-1].type == "done" for job_id in batch + interactive)
    assert most_at_once(batch_jobs) == 2  # never more than BATCH_LANE_SLOTS
    # Queued before them, the batch items still started after every interactive job.
    assert max(job.started_at for job in interactive_jobs) <= min(job.started_at for job in batch_jobs)


class ArrivingWorker(CPUWorker):
    """Enqueues one interactive job once two beam searches decode in its batch, as a client arriving then would."""

    arrival: dict = {}

    def step_engine(self) -> None:
        super().step_engine()
        beams = {row.group for row in self.engine.running if isinstance(row, GroupRow)}
        if not self.arrival["job_id"] and len(beams) == 2:
            self.arrival["job_id"] = enqueue(self.connection, self.arrival["weights"], "A short question",
                                             max_tokens=4, temperature=0)
            self.arrival["beams_running_at"] = now()


def test_an_interactive_job_arriving_while_beam_searches_fill_their_places_starts_at_once(connection,
                                                                                          tiny_weights):
    beams = [enqueue(connection, tiny_weights, f"Tell me a story number {i}", Lane.SIDE, JobKind.BEAM,
                     max_tokens=40) for i in range(3)]
    ArrivingWorker.arrival = {"job_id": None, "weights": tiny_weights}
    make_worker(connection, tiny_weights, ArrivingWorker).work(burst=True)
    arrived = ArrivingWorker.arrival["job_id"]
    assert arrived is not None, "the beam searches never ran two at once"
    assert read_backlog(connection, arrived)[-1].type == "done"
    beam_jobs = [fetch(connection, job_id) for job_id in beams]
    assert most_at_once(beam_jobs) == 2  # MAX_SIDE_TASKS: the third waited for a place
    # The interactive job did not wait for a beam search to end (before lanes, it waited for both).
    assert fetch(connection, arrived).started_at < min(job.ended_at for job in beam_jobs)


def test_a_job_that_waited_past_its_queue_deadline_fails_without_running(connection, tiny_weights):
    late = enqueue(connection, tiny_weights, "Too late", deadline_s=5, max_tokens=4)
    patient = enqueue(connection, tiny_weights, "Patient", max_tokens=4)  # no deadline (a batch prompt's default)
    for job_id in (late, patient):  # both waited a minute
        job = fetch(connection, job_id)
        job.enqueued_at = now() - timedelta(seconds=60)
        job.save()
    make_worker(connection, tiny_weights).work(burst=True)
    events = read_backlog(connection, late)
    assert [event.type for event in events] == ["error"]  # not a token was generated
    error = events[0].data["error"]
    assert error["type"] == "queue_timeout" and "deadline of 5 s" in error["message"]
    assert late in FailedJobRegistry("cpu", connection=connection).get_job_ids()
    assert read_backlog(connection, patient)[-1].type == "done"


def test_every_job_that_held_a_slot_counts_in_its_lanes_recent_throughput(connection, tiny_weights):
    done = [enqueue(connection, tiny_weights, f"Prompt {i}", max_tokens=3) for i in range(3)]
    batch = enqueue(connection, tiny_weights, "Batch prompt", Lane.BATCH, max_tokens=3)
    late = enqueue(connection, tiny_weights, "Late", Lane.BATCH, deadline_s=1, max_tokens=3)
    job = fetch(connection, late)
    job.enqueued_at = now() - timedelta(seconds=30)
    job.save()
    make_worker(connection, tiny_weights).work(burst=True)
    assert {m.decode() for m in connection.zrange(finished_key("cpu"), 0, -1)} == set(done)
    # The job that timed out in the queue never started: it freed no slot, so it is not throughput.
    assert {m.decode() for m in connection.zrange(finished_key("cpu:batch"), 0, -1)} == {batch}


class EndingsWatcher(CPUWorker):
    """Keeps what it advertised as its jobs' endings each time, beside what it was running then."""

    seen: list = []

    def advertise_endings(self) -> None:
        super().advertise_endings()
        steps = {job_id: entry.sequence.steps_left for job_id, entry in self.running.items() if entry.sequence}
        mean_step = statistics.fmean(self.step_times) if self.step_times else 0.0
        self.seen.append((json.loads(self.connection.hget(self.key, ENDINGS_FIELD))["jobs"], steps, mean_step))


def test_a_worker_advertises_when_each_running_interactive_job_ends(connection, tiny_weights, monkeypatch):
    monkeypatch.setattr("workers.batching.ENDINGS_EVERY_S", 0.0)  # every turn of the loop, to see each one
    short = enqueue(connection, tiny_weights, "Short", max_tokens=4, temperature=0)
    long = enqueue(connection, tiny_weights, "Long", max_tokens=12, temperature=0)
    batch = enqueue(connection, tiny_weights, "A batch prompt", Lane.BATCH, max_tokens=12, temperature=0)
    EndingsWatcher.seen = []
    make_worker(connection, tiny_weights, EndingsWatcher).work(burst=True)
    seen = EndingsWatcher.seen
    both = [(jobs, steps, mean) for jobs, steps, mean in seen if set(jobs) == {short, long}]
    assert both, "the two interactive jobs never ran together"
    for jobs, steps, mean in both:
        assert batch in steps  # it ran beside them, but the interactive lane does not wait for batch items
        # Each job: the steps it has left (to its max_tokens) times the loop's mean step time.
        assert jobs == {job_id: pytest.approx(steps[job_id] * mean, abs=1e-3) for job_id in (short, long)}
        assert jobs[long] > jobs[short] or mean == 0
    assert any(mean > 0 for _, _, mean in both)
    assert seen[-1][0] == {}  # its batch emptied: every slot is free
