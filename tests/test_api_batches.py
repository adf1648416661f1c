"""`POST /generate_batch` and `GET /batches/<id>`: one job per prompt, results in the prompts' order, a
failed prompt in its own slot, polling a batch that runs in the background, and bad input."""

from __future__ import annotations

import pytest
from rq.job import Job
from rq.results import Result
from rq.serializers import JSONSerializer

from api import create_app
from api.jobs.batch_store import batch_key
from shared.events import backlog_key, read_backlog
from shared.tokenizer import load_tokenizer
from tests.fixtures_jobs import SCRIPT, ScriptedWorker, queued_jobs

PROMPTS = ["The capital of France is", "Once upon a time", "The largest planet is Jupiter, which"]


def expected_result(app, payload: dict, prompt: str, tokens: int = 3) -> dict:
    """The /generate answer the scripted worker's events make for `prompt`."""
    return {"job_id": payload["job_id"], "input": prompt, "backend": "cpu",
            "output_ids": [token for token, _ in SCRIPT[:tokens]],
            "output_text": "".join(text for _, text in SCRIPT[:tokens]), "finish_reason": "length",
            "usage": {"prompt_tokens": len(load_tokenizer(app.config["MODEL_DIR"]).encode(prompt)),
                      "completion_tokens": tokens}}


def test_wait_true_answers_every_prompt_in_order(app, client, redis_client, live_worker):
    live_worker("cpu")
    worker = ScriptedWorker(redis_client, "cpu", jobs=3)
    worker.start()
    response = client.post("/generate_batch", json={"prompts": PROMPTS, "max_tokens": 3, "temperature": 0})
    worker.finish()
    assert response.status_code == 200, response.json
    body = response.json
    assert body["status"] == "done" and body["progress"] == {"done": 3, "total": 3}
    tokenizer = load_tokenizer(app.config["MODEL_DIR"])
    for prompt, payload, result in zip(PROMPTS, worker.payloads, body["results"], strict=True):
        assert payload["prompt_ids"] == tokenizer.encode(prompt) and payload["kind"] == "generate"
        assert payload["sampling"]["max_tokens"] == 3 and payload["sampling"]["temperature"] == 0
        assert result == expected_result(app, payload, prompt)
    assert redis_client.exists(batch_key(body["batch_id"]))


def test_a_failing_prompt_is_reported_in_its_own_slot(app, client, redis_client, live_worker):
    live_worker("cpu")
    error = {"type": "internal_error", "message": "out of memory"}
    worker = ScriptedWorker(redis_client, "cpu", jobs=3, errors={1: error})
    worker.start()
    response = client.post("/generate_batch", json={"prompts": PROMPTS, "max_tokens": 3})
    worker.finish()
    assert response.status_code == 200
    results = response.json["results"]
    assert results[1] == {"error": error}
    assert results[0] == expected_result(app, worker.payloads[0], PROMPTS[0])
    assert results[2] == expected_result(app, worker.payloads[2], PROMPTS[2])
    assert response.json["progress"] == {"done": 3, "total": 3}


def test_wait_false_answers_202_and_the_batch_can_be_polled(app, client, redis_client, live_worker):
    live_worker("cpu")
    response = client.post("/generate_batch", json={"prompts": PROMPTS, "max_tokens": 3, "wait": False})
    assert response.status_code == 202
    batch_id = response.json["batch_id"]
    assert response.json == {"batch_id": batch_id, "status": "running", "total": 3}
    assert response.headers["Location"] == f"/batches/{batch_id}"
    # Every job is queued before any worker runs, and the record lives BATCH_TTL_S.
    assert queued_jobs(redis_client) == 3
    assert 3500 < redis_client.ttl(batch_key(batch_id)) <= 3600
    assert poll(client, batch_id) == {"batch_id": batch_id, "status": "running",
                                      "progress": {"done": 0, "total": 3}, "results": [None, None, None]}
    first = ScriptedWorker(redis_client, "cpu")
    first.start()
    first.finish()
    status = poll(client, batch_id)
    assert status["status"] == "running" and status["progress"] == {"done": 1, "total": 3}
    assert status["results"] == [expected_result(app, first.payload, PROMPTS[0]), None, None]
    rest = ScriptedWorker(redis_client, "cpu", jobs=2)
    rest.start()
    rest.finish()
    status = poll(client, batch_id)
    assert status["status"] == "done" and status["progress"] == {"done": 3, "total": 3}
    assert status["results"][2] == expected_result(app, rest.payloads[1], PROMPTS[2])


def poll(client, batch_id: str) -> dict:
    response = client.get(f"/batches/{batch_id}")
    assert response.status_code == 200, response.json
    return response.json


def test_results_outlive_the_event_backlog_through_rq(app, client, redis_client, live_worker):
    live_worker("cpu")
    batch_id = client.post("/generate_batch", json={"prompts": PROMPTS[:2], "max_tokens": 3, "wait": False}
                           ).json["batch_id"]
    worker = ScriptedWorker(redis_client, "cpu", jobs=2)
    worker.start()
    worker.finish()
    done = poll(client, batch_id)["results"]
    kept, lost = (payload["job_id"] for payload in worker.payloads)
    # After BACKLOG_TTL_S the events are gone; RQ still has the first job's result (kept BATCH_TTL_S).
    job = Job.fetch(kept, connection=redis_client, serializer=JSONSerializer)
    assert job.result_ttl == 3600 and job.failure_ttl == 3600
    done_event = read_backlog(redis_client, kept)[-1].data  # what a real worker stores as the job's result
    Result.create(job, Result.Type.SUCCESSFUL, ttl=3600, return_value=done_event)
    redis_client.delete(backlog_key(kept), backlog_key(lost))
    Job.fetch(lost, connection=redis_client).delete()
    results = poll(client, batch_id)["results"]
    assert results[0] == done[0]
    assert results[1]["error"]["type"] == "job_lost"


def test_an_unknown_batch_is_a_404(client):
    response = client.get("/batches/0123456789abcdef0123456789abcdef")
    assert response.status_code == 404
    assert response.json["error"]["type"] == "not_found"


def test_more_prompts_than_the_setting_allows_is_a_400(app_config, redis_client, live_worker):
    live_worker("cpu")
    client = create_app({**app_config, "MAX_BATCH_PROMPTS": 2}).test_client()
    response = client.post("/generate_batch", json={"prompts": PROMPTS})
    assert response.status_code == 400
    assert response.json["error"]["field"] == "prompts" and "at most 2" in response.json["error"]["message"]
    assert queued_jobs(redis_client) == 0


BAD_BATCHES = [
    pytest.param({}, "prompts", "'prompts' is required", id="missing"),
    pytest.param({"prompts": []}, "prompts", "'prompts'", id="empty-list"),
    pytest.param({"prompts": "hi"}, "prompts", "a list", id="not-a-list"),
    pytest.param({"prompts": ["hi", ""]}, "prompts", "'prompts[1]'", id="empty-prompt"),
    pytest.param({"prompts": ["hi", 5]}, "prompts", "'prompts[1]'", id="prompt-not-text"),
    pytest.param({"prompts": ["hi"] * 65}, "prompts", "at most 64", id="over-the-default-limit"),
    pytest.param({"prompts": ["hi", "word " * 200]}, "prompts", "'prompts[1]'", id="prompt-too-long"),
    pytest.param({"prompts": ["hi"], "max_tokens": 0}, "max_tokens", "'max_tokens'", id="max-tokens"),
    pytest.param({"prompts": ["hi"], "wait": "no"}, "wait", "'wait'", id="wait-string"),
    pytest.param({"prompts": ["hi"], "prompt": "hi"}, "prompt", "'prompt'", id="unknown-field"),
]


@pytest.mark.parametrize(("body", "field", "named"), BAD_BATCHES)
def test_bad_batches_are_400s_naming_the_prompt(client, redis_client, live_worker, body, field, named):
    live_worker("cpu")
    response = client.post("/generate_batch", json=body)
    assert response.status_code == 400
    assert response.json["error"]["field"] == field and named in response.json["error"]["message"]
    assert queued_jobs(redis_client) == 0
    assert not redis_client.keys("llm:batch:*")


def test_a_batch_for_a_pool_without_workers_is_a_503(client, redis_client):
    response = client.post("/generate_batch", json={"prompts": PROMPTS})
    assert response.status_code == 503 and response.json["error"]["type"] == "no_worker"
    assert not redis_client.keys("llm:batch:*")


def test_the_batch_routes_are_documented(client):
    operation = client.get("/openapi.json").json["paths"]["/generate_batch"]["post"]
    assert set(operation["responses"]) >= {"200", "202", "400", "503"}
    assert "Location" in operation["responses"]["202"]["headers"]
