"""Admission control: a lane past its bound answers 429 at once, with Retry-After from its recent throughput."""

from __future__ import annotations

import json
import threading
import time

import pytest
from rq import Queue

from api import create_app
from api.jobs.admission import UNKNOWN_RATE_RETRY_S, lane_bound
from shared.exceptions import OverloadedError
from shared.lanes import ENDINGS_FIELD, ENDINGS_STALE_S, LANE_SLOTS_FIELD, Lane, endings_from, finished_key, queue_name
from shared.settings import Settings
from tests.fixtures_jobs import queued_jobs

BODY = {"prompt": "Hello", "max_tokens": 2}


@pytest.fixture
def busy_app(app_config):
    """An app whose lanes hold a worker's 2 slots plus 1 waiting job (MAX_QUEUED 1)."""
    return create_app({**app_config, "MAX_QUEUED": 1, "MAX_BATCH_SIZE": 2, "MAX_QUEUED_BATCH": 4})


def advertise(redis_client, worker, **slots) -> None:
    """What a batching worker writes when it registers: its slots per lane."""
    redis_client.hset(worker.key, LANE_SLOTS_FIELD, json.dumps(slots))


def run_jobs(redis_client, worker, endings: dict[str, float], also_running: tuple[str, ...] = ()) -> None:
    """Jobs running on `worker` (RQ's started registry), and when it says each of `endings` will end."""
    started = f"rq:wip:{queue_name('cpu', Lane.INTERACTIVE)}"
    for job_id in [*endings, *also_running]:
        redis_client.zadd(started, {f"{job_id}:exec": time.time() + 60})
    redis_client.hset(worker.key, ENDINGS_FIELD, json.dumps({"at": time.time(), "jobs": endings}))


def end_jobs(redis_client, ends: list[float], queue: str = "cpu") -> None:
    """Log jobs of `queue` as a worker does when they end, at the given times."""
    for index, end in enumerate(ends):
        redis_client.zadd(finished_key(queue), {f"job{index}-{end}": end})


def open_streams(client, count: int, path: str = "/stream", body: dict = BODY) -> list:
    """POST `count` streams and keep them open (a stream whose client leaves cancels its job, freeing its place)."""
    return [client.post(path, json=body) for _ in range(count)]


def test_past_its_bound_a_lane_answers_429_at_once_in_json_with_retry_after(busy_app, redis_client, live_worker):
    live_worker("cpu")  # no advertised slots: counts with MAX_BATCH_SIZE's
    client = busy_app.test_client()
    streams = open_streams(client, 3)
    assert [stream.status_code for stream in streams] == [200, 200, 200]
    started = time.perf_counter()
    refused = client.post("/stream", json=BODY)
    elapsed = time.perf_counter() - started
    assert refused.status_code == 429 and refused.is_json
    assert refused.json["error"]["type"] == "overloaded"
    assert "'cpu' pool is busy" in refused.json["error"]["message"]
    # Nothing has ended yet, so there is no rate: UNKNOWN_RATE_RETRY_S, scattered by up to half either way.
    assert UNKNOWN_RATE_RETRY_S // 2 <= int(refused.headers["Retry-After"]) <= UNKNOWN_RATE_RETRY_S * 3 // 2 + 1
    assert queued_jobs(redis_client) == 3  # the refused request left nothing behind
    assert elapsed < 0.5


def test_the_openai_routes_refuse_in_openais_shape(busy_app, redis_client, live_worker):
    live_worker("cpu")
    client = busy_app.test_client()
    _streams = open_streams(client, 3)  # kept open until the test ends
    refused = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2})
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
    assert refused.json["error"]["type"] == "requests" and refused.json["error"]["code"] == "overloaded"
    assert set(refused.json["error"]) == {"message", "type", "param", "code"}


def test_beam_searches_have_a_lane_of_their_own(busy_app, redis_client, live_worker):
    live_worker("cpu")
    client = busy_app.test_client()
    beam = {"messages": ["Hi"], "beam_width": 2, "max_tokens": 4}
    # The side lane holds MAX_SIDE_TASKS (2) running plus MAX_QUEUED (1) waiting, whatever the interactive lane holds.
    beams = open_streams(client, 4, "/stream_chat_beam", beam)
    assert [stream.status_code for stream in beams] == [200, 200, 200, 429]
    assert open_streams(client, 1)[0].status_code == 200
    assert Queue(queue_name("cpu", Lane.SIDE), connection=redis_client).count == 3


def test_a_batch_is_admitted_whole_or_not_at_all(busy_app, redis_client, live_worker):
    live_worker("cpu")
    client = busy_app.test_client()
    prompts = {"prompts": ["One", "Two", "Three"], "max_tokens": 2, "wait": False}
    assert client.post("/generate_batch", json=prompts).status_code == 202
    # The batch lane holds its slot (one of MAX_BATCH_SIZE 2) plus MAX_QUEUED_BATCH (4): 3 more do not fit.
    refused = client.post("/generate_batch", json=prompts)
    assert refused.status_code == 429 and "3 asked" in refused.json["error"]["message"]
    assert Queue(queue_name("cpu", Lane.BATCH), connection=redis_client).count == 3
    assert not list(redis_client.scan_iter("llm:batch:*"))[1:]  # only the first batch's record exists
    assert open_streams(client, 1)[0].status_code == 200  # interactive work has its own lane


def test_the_bound_comes_from_live_workers_slots_and_the_lanes_recent_rate(redis_client, live_worker):
    settings = Settings(max_queue_wait_s=2)
    for _ in range(2):
        advertise(redis_client, live_worker("cpu"), interactive=16, side=2, batch=12)
    cold = lane_bound(redis_client, "cpu", Lane.INTERACTIVE, settings)
    assert (cold.capacity, cold.bound, cold.rate) == (32, 33, None)  # before any job ended: one per 32 slots
    clock = time.time()
    end_jobs(redis_client, [clock - 59.75 + i / 2 for i in range(120)])  # 2 jobs/s
    end_jobs(redis_client, [clock - 120])  # outside the window
    warm = lane_bound(redis_client, "cpu", Lane.INTERACTIVE, settings)
    assert warm.rate == pytest.approx(2.0)
    assert warm.bound == 32 + 4  # what 2 jobs/s start within MAX_QUEUE_WAIT_S (2 s)
    # 5 jobs past the bound take 2.5 s at 2 jobs/s; then the cap
    assert warm.retry_after_s(warm.bound, 5) == 2.5 and warm.retry_after_s(warm.bound, 1000) == 60
    assert lane_bound(redis_client, "cpu", Lane.BATCH, settings).bound == 24 + settings.max_queued_batch


def test_the_interactive_bound_admits_what_the_workers_start_within_the_wait(redis_client, live_worker):
    """Jobs that started together end together: a lane's average rate would admit requests that then wait a whole
    generation, so the bound counts the running jobs their workers say end within MAX_QUEUE_WAIT_S instead."""
    worker = live_worker("cpu")
    advertise(redis_client, worker, interactive=4, side=2, batch=3)
    end_jobs(redis_client, [time.time() - i for i in range(60)])  # 1 job/s: the rate alone would allow 2 waiting
    run_jobs(redis_client, worker, {"a": 0.4, "b": 1.5, "c": 7.0}, also_running=("d",))  # d: not advertised yet
    settings = Settings(max_queue_wait_s=2)
    limit = lane_bound(redis_client, "cpu", Lane.INTERACTIVE, settings)
    assert (limit.capacity, limit.held, limit.bound) == (4, 4, 4 + 2)  # a and b end within 2 s
    # The next request would be 3rd in the queue, after the jobs waiting for a's and b's slots: c's slot, in 7 s.
    assert limit.retry_after_s(held=6, asked=1) == pytest.approx(7.0 - 2, abs=0.1)
    # d started after its worker last wrote its endings: it counts as ending last, so no Retry-After is built on it.
    assert limit.retry_after_s(held=7, asked=1) == pytest.approx(2.0)  # (past what the endings tell: the rate's)
    # Jobs that ended (gone from the registry) before their worker wrote again do not count.
    redis_client.zrem(f"rq:wip:{queue_name('cpu', Lane.INTERACTIVE)}", "a:exec")
    assert lane_bound(redis_client, "cpu", Lane.INTERACTIVE, settings).bound == 4 + 1


def test_endings_age_with_their_record_and_a_stale_one_is_not_trusted():
    record = json.dumps({"at": 1000.0, "jobs": {"a": 3.0, "b": 0.5}})
    assert endings_from(record, clock=1001.0) == {"a": 2.0, "b": 0.0}
    assert endings_from(record, clock=1000.0 + ENDINGS_STALE_S + 1) is None  # a worker frozen mid-batch
    idle = json.dumps({"at": 1000.0, "jobs": {}})
    assert endings_from(idle, clock=1000.0 + 3600) == {}  # an idle worker's record stays true
    for other in ('{"at": 1000.0, "s": [1.0]}', "[1, 2]", "not json"):  # another release's: as if none
        assert endings_from(other, clock=1001.0) is None


def test_a_refused_crowd_is_told_scattered_times(busy_app, redis_client, live_worker):
    live_worker("cpu")
    end_jobs(redis_client, [time.time() - 5 * i for i in range(12)])  # 0.2 jobs/s: room in 5 s
    client = busy_app.test_client()
    _streams = open_streams(client, 3)
    headers = [client.post("/stream", json=BODY).headers for _ in range(20)]
    told = [int(h["Retry-After-Ms"]) for h in headers]
    assert len(set(told)) == 20 and all(2500 <= ms <= 7500 for ms in told)  # 5 s, scattered by half
    assert all(int(h["Retry-After"]) == round(int(h["Retry-After-Ms"]) / 1000) for h in headers)


def test_a_starting_workers_slots_count_for_the_bound(busy_app, redis_client, starting_worker):
    starting_worker("cpu", max_batch_size=2)  # its slots are known from its settings before its model loads
    assert lane_bound(redis_client, "cpu", Lane.INTERACTIVE, Settings(max_queued=1)).bound == 3
    streams = open_streams(busy_app.test_client(), 4)
    assert [stream.status_code for stream in streams] == [200, 200, 200, 429]  # 2 slots, 1 waiting, then full
    assert queued_jobs(redis_client) == 3


def test_running_batch_items_take_slots_from_the_interactive_lane(redis_client, live_worker):
    advertise(redis_client, live_worker("cpu"), interactive=8, side=2, batch=6)
    started = f"rq:wip:{queue_name('cpu', Lane.BATCH)}"
    redis_client.zadd(started, {f"job{i}:exec": time.time() + 60 for i in range(4)})  # 4 batch items running
    assert lane_bound(redis_client, "cpu", Lane.INTERACTIVE, Settings()).capacity == 4


def test_concurrent_requests_never_overshoot_the_bound(busy_app, redis_client, live_worker):
    live_worker("cpu")
    responses = []  # kept open: a stream whose client leaves cancels its job, which frees its place

    def post() -> None:
        responses.append(busy_app.test_client().post("/stream", json=BODY))

    threads = [threading.Thread(target=post) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(response.status_code for response in responses) == [200] * 3 + [429] * 9
    assert queued_jobs(redis_client) == 3
    for response in responses:
        response.close()


def test_an_overloaded_error_always_says_when_to_come_back():
    assert OverloadedError("busy", retry_after_s=0).retry_after_s == 1
