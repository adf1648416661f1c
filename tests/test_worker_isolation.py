"""One job's failure is that job's alone: a fault planted in one generation, beam or scoring job's work fails
it (an `error` event, failed in RQ) while the jobs of every kind beside it in the worker's batch finish with the
output they have without the fault. A fault in the batch's shared decode pass fails the jobs in the engine and
the worker serves on. And the reranker is loaded before the worker registers.

A real `CPUWorker` in-process (RQ's burst mode) on the tiny model, against the real Redis of
TEST_REDIS_URL: each test has a queue of its own, and its keys are removed afterwards.
"""

from __future__ import annotations

import uuid

import pytest
import redis
from rq import Queue
from rq.job import JobStatus
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer

from shared.events import read_backlog
from shared.protocol import JOB_FUNCTION, BeamOptions, GenerationJob, JobKind, ScoreOptions
from shared.sampling import SamplingParams
from shared.settings import Settings
from shared.tokenizer import load_tokenizer
from tests.service_fixtures import TEST_REDIS_URL, private_queue
from workers.cpu import CPUWorker
from workers.engine.engine import Engine
from workers.engine.groups import GroupRow
from workers.features import reranker as reranker_module
from workers.features.beam import BeamGroup
from workers.features.reranker import Reranker

pytest_plugins = ["tests.engine_fixtures"]
pytestmark = pytest.mark.usefixtures("one_thread")


class InjectedFault(RuntimeError):
    """The failure a test plants in one job's work."""


JOBS = {  # name -> (kind, prompt); all in the interactive queue, taken at once: they share the worker's batch
    "gen0": ("generate", "The history of the Roman Empire"),
    "gen1": ("generate", "def f(x):\n    return x * 2"),
    "beam0": ("beam", "Once upon a time"),
    "score0": ("score", "The capital of France is"),
    "gen2": ("generate", "Hi there, how are you?"),
    "beam1": ("beam", "A story about the sea"),
    "score1": ("score", "My favourite colour is"),
}
FIRST_BATCH = ("gen0", "gen1", "beam0", "score0")


@pytest.fixture
def pool():
    """A queue name of the test's own on the real Redis; every key naming it is deleted afterwards."""
    with private_queue("isolation") as queue:
        yield queue


def enqueue_all(connection, name: str, weights, prefix: str = "") -> dict[str, str]:
    """Enqueue JOBS on the queue `name`; their ids (which contain `name`) by job name."""
    tokenizer = load_tokenizer(str(weights))
    queue = Queue(name, connection=connection, serializer=JSONSerializer)
    ids = {}
    for job_name, (kind, prompt) in JOBS.items():
        job_id = f"{name}-{prefix}{job_name}"
        options = {"generate": {},
                   "beam": {"beam": BeamOptions(beam_width=2, use_rerank=job_name == "beam0", context=prompt)},
                   "score": {"score": ScoreOptions(candidates=["Paris", "a city in France", "blue"], context=prompt)},
                   }[kind]
        job = GenerationJob(job_id=job_id, prompt_ids=tokenizer.encode(prompt), kind=JobKind(kind),
                            sampling=SamplingParams(max_tokens=8, temperature=0), **options)
        queue.enqueue(JOB_FUNCTION, kwargs={"payload": job.model_dump(mode="json")}, job_id=job_id, job_timeout=60)
        ids[job_name] = job_id
    return ids


def run_worker(connection, name: str, weights) -> CPUWorker:
    settings = Settings.from_env({}, model_dir=str(weights), worker_device="cpu", max_seq_len=256,
                                 compile_decode=False)
    worker = CPUWorker([Queue(name, connection=connection, serializer=JSONSerializer)], connection=connection,
                       settings=settings, name=f"{name}-worker")
    worker.work(burst=True)
    return worker


def outcome(connection, job_id: str) -> dict:
    """The job's terminal event's data, without the job id."""
    data = dict(read_backlog(connection, job_id)[-1].data)
    data.pop("job_id", None)
    return data


@pytest.fixture(scope="module")
def unfaulted(tiny_weights) -> dict[str, dict]:
    """Every job's outcome on a worker without faults."""
    connection = redis.Redis.from_url(TEST_REDIS_URL)
    name = f"isolation-{uuid.uuid4().hex[:12]}"
    ids = enqueue_all(connection, name, tiny_weights)
    run_worker(connection, name, tiny_weights)
    outcomes = {job_name: outcome(connection, job_id) for job_name, job_id in ids.items()}
    for key in connection.scan_iter(match=f"*{name}*", count=1000):
        connection.delete(key)
    connection.srem("rq:queues", f"rq:queue:{name}")
    assert all("error" not in data for data in outcomes.values()), outcomes
    return outcomes


def fail_after(calls: int, method):
    """`method`, raising InjectedFault from its `calls + 1`-th call on."""
    count = {"calls": 0}

    def failing(*args, **kwargs):
        count["calls"] += 1
        if count["calls"] > calls:
            raise InjectedFault("injected")
        return method(*args, **kwargs)

    return failing


def plant_generation_fault(monkeypatch, prompt_ids: list[int]) -> None:
    """The generation job of `prompt_ids` fails detokenizing its third token."""
    add = Engine.add

    def add_with_fault(self, sequence, resumed_ids=(), **options):
        if sequence.prompt_ids == prompt_ids:
            sequence.detokenizer.add = fail_after(2, sequence.detokenizer.add)
        return add(self, sequence, resumed_ids, **options)

    monkeypatch.setattr(Engine, "add", add_with_fault)


def plant_beam_fault(monkeypatch, prompt_ids: list[int]) -> None:
    """The beam search of `prompt_ids` fails choosing its third token."""
    advance = BeamGroup.advance
    calls = {"count": 0}

    def advance_with_fault(self, logits):
        if self.prompt_ids == prompt_ids:
            calls["count"] += 1
            if calls["count"] == 3:
                raise InjectedFault("injected")
        return advance(self, logits)

    monkeypatch.setattr(BeamGroup, "advance", advance_with_fault)


def plant_score_fault(monkeypatch, context: str) -> None:
    """The reranker fails on the scoring job whose context is `context` (after its model scoring)."""
    select_best = Reranker.select_best

    def select_with_fault(self, job_context, candidates, lm_scores):
        if job_context == context:
            raise InjectedFault("injected")
        return select_best(self, job_context, candidates, lm_scores)

    monkeypatch.setattr(Reranker, "select_best", select_with_fault)


CULPRITS = {"generate": "gen1", "beam": "beam0", "score": "score0"}


@pytest.mark.parametrize("kind", ["generate", "beam", "score"])
def test_a_fault_in_one_jobs_work_fails_that_job_alone(pool, tiny_weights, unfaulted, monkeypatch, kind):
    connection, name = pool
    culprit = CULPRITS[kind]
    prompt_ids = load_tokenizer(str(tiny_weights)).encode(JOBS[culprit][1])
    {"generate": lambda: plant_generation_fault(monkeypatch, prompt_ids),
     "beam": lambda: plant_beam_fault(monkeypatch, prompt_ids),
     "score": lambda: plant_score_fault(monkeypatch, JOBS[culprit][1])}[kind]()
    ids = enqueue_all(connection, name, tiny_weights)
    run_worker(connection, name, tiny_weights)

    events = read_backlog(connection, ids[culprit])
    error = events[-1]
    assert error.type == "error" and error.data["error"]["type"] == "internal_error"
    assert "failed on this job" in error.data["error"]["message"]
    if kind == "generate":  # it streamed two tokens before its third failed
        assert [e.data["token"] for e in events[:-1]] == unfaulted[culprit]["output_ids"][:2]
    queue = Queue(name, connection=connection, serializer=JSONSerializer)
    assert queue.fetch_job(ids[culprit]).get_status() == JobStatus.FAILED
    assert FailedJobRegistry(name, connection=connection).get_job_ids() == [ids[culprit]]
    for job_name in JOBS.keys() - {culprit}:
        assert outcome(connection, ids[job_name]) == unfaulted[job_name], job_name
        assert queue.fetch_job(ids[job_name]).get_status() == JobStatus.FINISHED
    # The others of the first batch ran beside the culprit, on the same worker's steps.
    failed = queue.fetch_job(ids[culprit])
    for job_name in set(FIRST_BATCH) - {culprit}:
        other = queue.fetch_job(ids[job_name])
        assert other.started_at < failed.ended_at and failed.started_at < other.ended_at, job_name


def test_a_failing_decode_pass_fails_the_jobs_in_the_engine_and_the_worker_serves_on(pool, tiny_weights, unfaulted,
                                                                                     monkeypatch):
    connection, name = pool
    in_engine: set[str] = set()
    step = Engine.step

    def step_failing_once(self):
        # Once a beam search decodes beside the generations: the shared pass of every running row fails.
        if not in_engine and any(isinstance(row, GroupRow) for row in self.running):
            in_engine.update(job.id for job in (*self.active, *self.waiting))
            raise InjectedFault("a kernel failure in the batch's forward pass")
        return step(self)

    monkeypatch.setattr(Engine, "step", step_failing_once)
    ids = enqueue_all(connection, name, tiny_weights)
    worker = run_worker(connection, name, tiny_weights)
    failed = {job_name for job_name, job_id in ids.items() if job_id in in_engine}
    assert {"beam0", "gen0"} <= failed  # a beam's rows and a generation's shared the pass
    for job_name in failed:
        assert outcome(connection, ids[job_name])["error"]["type"] == "internal_error", job_name
    for job_name in JOBS.keys() - failed:  # ended before it, or taken after it
        assert outcome(connection, ids[job_name]) == unfaulted[job_name], job_name
    assert sorted(FailedJobRegistry(name, connection=connection).get_job_ids()) == sorted(ids[n] for n in failed)
    assert worker.engine is not None and not worker.engine.has_work
    monkeypatch.setattr(Engine, "step", step)
    again = enqueue_all(connection, name, tiny_weights, prefix="again-")
    worker.work(burst=True)  # the same worker, its model still loaded
    assert {job_name: outcome(connection, job_id) for job_name, job_id in again.items()} == unfaulted


def test_the_reranker_is_loaded_before_the_worker_registers(pool, tiny_weights, monkeypatch):
    connection, name = pool
    seen = {}
    register_birth = CPUWorker.register_birth

    def recording_register_birth(self):
        seen["reranker"] = self.reranker
        seen["embedders_loaded"] = reranker_module.load_embedder.cache_info().currsize
        register_birth(self)

    monkeypatch.setattr(CPUWorker, "register_birth", recording_register_birth)
    run_worker(connection, name, tiny_weights)
    assert isinstance(seen["reranker"], Reranker) and seen["embedders_loaded"] >= 1


def test_a_worker_without_reranker_files_serves_on_and_fails_only_jobs_that_need_one(pool, tiny_weights, unfaulted,
                                                                                      monkeypatch, tmp_path, caplog):
    connection, name = pool
    monkeypatch.setattr(reranker_module, "default_model_dir", lambda: tmp_path / "no-reranker-here")
    ids = enqueue_all(connection, name, tiny_weights)
    worker = run_worker(connection, name, tiny_weights)
    assert worker.reranker is None and "no reranker" in caplog.text
    needs_one = {"beam0", "score0", "score1"}  # beam0 asks for use_rerank; scoring always reranks
    for job_name in needs_one:
        events = read_backlog(connection, ids[job_name])
        assert [e.type for e in events] == ["error"], job_name  # at once: no search ran first
        assert events[0].data["error"]["type"] == "unavailable"
        assert "no reranker" in events[0].data["error"]["message"]
    for job_name in JOBS.keys() - needs_one:
        assert outcome(connection, ids[job_name]) == unfaulted[job_name], job_name
