"""`/jobs/<id>`: status, and cancelling with DELETE."""

from __future__ import annotations

from rq.job import Job, JobStatus

from shared.events import cancel_key
from tests.fixtures_jobs import ScriptedWorker, enqueue_job, publish_generation, queued_jobs
from tests.sse_client import parse_sse

UNKNOWN = "0123456789abcdef0123456789abcdef"


def test_deleting_a_queued_job_cancels_it_and_ends_its_stream(client, redis_client, live_worker):
    live_worker("cpu")  # registered, but nothing takes the job: it stays queued
    stream = client.post("/stream", json={"prompt": "Hello"}, buffered=False)
    job_id = stream.headers["X-Job-Id"]
    response = client.delete(f"/jobs/{job_id}")
    assert response.status_code == 200
    assert response.json == {"job_id": job_id, "status": "cancelled"}
    events, _ = parse_sse(stream.get_data(as_text=True))  # ends instead of waiting for a worker
    assert [(e["id"], e["event"]) for e in events] == [(1, "error")]
    assert events[0]["data"]["error"]["type"] == "cancelled"
    assert queued_jobs(redis_client) == 0
    status = client.get(f"/jobs/{job_id}").json
    assert status["status"] == "canceled" and status["error"]["type"] == "cancelled"


def test_deleting_a_running_job_asks_its_worker_to_stop(client, redis_client):
    job_id = enqueue_job(redis_client)
    Job.fetch(job_id, connection=redis_client).set_status(JobStatus.STARTED)
    response = client.delete(f"/jobs/{job_id}")
    assert response.status_code == 202
    assert response.json == {"job_id": job_id, "status": "cancelling"}
    assert redis_client.get(cancel_key(job_id)) == b"1"
    assert redis_client.ttl(cancel_key(job_id)) > 0


def test_deleting_a_finished_job_changes_nothing(client, redis_client):
    publish_generation(redis_client, "finishedjob", [1])
    response = client.delete("/jobs/finishedjob")
    assert response.status_code == 200
    assert response.json == {"job_id": "finishedjob", "status": "finished"}
    assert redis_client.get(cancel_key("finishedjob")) is None


def test_unknown_jobs_are_404(client):
    for response in (client.get(f"/jobs/{UNKNOWN}"), client.delete(f"/jobs/{UNKNOWN}"),
                     client.get("/jobs/not.a.job.id")):
        assert response.status_code == 404
        assert response.json["error"]["type"] == "not_found"


def test_status_of_a_finished_job_carries_its_result(client, redis_client, live_worker):
    live_worker("cpu")
    worker = ScriptedWorker(redis_client, "cpu")
    worker.start()
    generated = client.post("/generate", json={"prompt": "Hello", "max_tokens": 2}).json
    worker.finish()
    status = client.get(f"/jobs/{generated['job_id']}").json
    assert status["status"] == "finished" and status["backend"] == "cpu" and status["events"] == 3
    assert status["result"]["output_text"] == generated["output_text"] == "Hello,"


def test_status_of_a_queued_job(client, redis_client):
    job_id = enqueue_job(redis_client, "gpu")
    assert client.get(f"/jobs/{job_id}").json == {"job_id": job_id, "status": "queued", "backend": "gpu",
                                                  "events": 0}
