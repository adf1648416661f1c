"""A worker's start: registered as `starting` before its model loads (so requests for its pool wait in the queue
instead of being refused), beating meanwhile, taking no job until loaded, and leaving at once if it fails or is
stopped while loading."""

from __future__ import annotations

import os
import signal
import threading

import fakeredis
import pytest
from rq import Worker
from rq.job import JobStatus

from shared.events import read_backlog
from shared.lanes import PoolWorker, pool_workers
from tests.test_worker_lanes import enqueue, fetch, make_worker
from workers.cpu import CPUWorker


@pytest.fixture
def connection():
    return fakeredis.FakeRedis()


class WatchedLoad(CPUWorker):
    """A CPU worker that runs `during_load(self)` when its model starts loading."""

    during_load = staticmethod(lambda worker: None)

    def load_engine(self):
        self.during_load(self)
        return super().load_engine()


def test_a_worker_counts_as_starting_while_it_loads_and_takes_its_first_job_once_loaded(connection, tiny_weights):
    job_id = enqueue(connection, tiny_weights, "Hello", max_tokens=4, temperature=0)
    seen = {}

    def look(worker):
        seen["workers"] = pool_workers(connection, "cpu")
        seen["rq state"] = Worker.find_by_key(worker.key, connection=connection).get_state()
        seen["job"] = fetch(connection, job_id).get_status()

    worker = make_worker(connection, tiny_weights, worker_class=WatchedLoad, max_batch_size=8, compile_decode=False)
    worker.during_load = look
    worker.work(burst=True)
    assert seen == {"workers": [PoolWorker({"interactive": 8, "side": 2, "batch": 6}, starting=True, endings={})],
                    "rq state": "starting",  # what `rq info` and rq-dashboard show
                    "job": JobStatus.QUEUED}  # not taken before the model was loaded
    assert read_backlog(connection, job_id)[-1].type == "done"


def test_a_worker_that_loads_for_longer_than_worker_dead_s_keeps_counting(connection, tiny_weights):
    listed = []

    def load_slowly(worker):  # a big model on a slow disk: 3 WORKER_DEAD_S, its record looked at 12 times
        for _ in range(12):
            listed.append(pool_workers(connection, "cpu"))
            threading.Event().wait(0.25)

    worker = make_worker(connection, tiny_weights, worker_class=WatchedLoad, worker_dead_s=1, compile_decode=False)
    worker.during_load = load_slowly
    worker.work(burst=True)
    assert all(len(workers) == 1 and workers[0].starting for workers in listed)


def test_a_worker_whose_model_cannot_load_leaves_the_pool_at_once(connection, tmp_path):
    worker = make_worker(connection, tmp_path / "nothing-here")
    with pytest.raises(SystemExit, match="weights"):
        worker.work(burst=True)
    assert pool_workers(connection, "cpu") == []
    assert connection.hexists(worker.key, "death")


def test_sigterm_while_loading_leaves_the_pool_at_once(connection, tiny_weights):
    before = signal.getsignal(signal.SIGTERM)
    worker = make_worker(connection, tiny_weights, worker_class=WatchedLoad, compile_decode=False)
    worker.during_load = lambda worker: os.kill(os.getpid(), signal.SIGTERM)  # a redeploy, mid-load
    with pytest.raises(SystemExit, match="stopped while loading"):
        worker.work(burst=True)
    assert pool_workers(connection, "cpu") == []
    assert signal.getsignal(signal.SIGTERM) is before
