"""`POST /generate`: one JSON answer built from the job's events, and the job the API enqueues for it."""

from __future__ import annotations

import pytest

from shared.tokenizer import load_tokenizer
from tests.fixtures_jobs import SCRIPT, ScriptedWorker
from tests.sse_client import parse_sse

PROMPT = "The capital of France is"


def run(client, redis_client, path: str, body: dict, error: dict | None = None):
    """POST `body` to `path` while a scripted CPU worker serves the job; (response, job payload)."""
    worker = ScriptedWorker(redis_client, "cpu", error=error)
    worker.start()
    response = client.post(path, json=body)
    return response, worker.finish()


def test_generate_answers_with_the_whole_output(app, client, redis_client, live_worker):
    live_worker("cpu")
    response, payload = run(client, redis_client, "/generate", {"prompt": PROMPT})
    assert response.status_code == 200
    result = response.json
    prompt_ids = load_tokenizer(app.config["MODEL_DIR"]).encode(PROMPT)
    assert result == {
        "job_id": payload["job_id"], "input": PROMPT, "backend": "cpu",
        "output_ids": [token for token, _ in SCRIPT], "output_text": "Hello, world!", "finish_reason": "eos",
        "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": len(SCRIPT)},
    }
    # The job carries token ids, not text, and the default max_tokens (DEFAULT_MAX_TOKENS = 32).
    assert payload["prompt_ids"] == prompt_ids
    assert payload["sampling"]["max_tokens"] == 32 and payload["backend"] == "cpu"


def test_sampling_fields_travel_to_the_worker(client, redis_client, live_worker):
    live_worker("cpu")
    body = {"prompt": PROMPT, "max_tokens": 2, "temperature": 0.5, "top_k": 40, "top_p": 0.9,
            "repetition_penalty": 1.1, "seed": 7, "stop": "\n"}
    response, payload = run(client, redis_client, "/generate", body)
    assert response.json["output_text"] == "Hello," and response.json["finish_reason"] == "length"
    assert payload["sampling"] == {"max_tokens": 2, "temperature": 0.5, "top_k": 40, "top_p": 0.9,
                                   "repetition_penalty": 1.1, "seed": 7, "stop": ["\n"]}


def test_generate_equals_the_concatenated_stream(client, redis_client, live_worker):
    live_worker("cpu")
    body = {"prompt": PROMPT, "max_tokens": 3, "temperature": 0}
    streamed, _ = run(client, redis_client, "/stream", body)
    events, _ = parse_sse(streamed.get_data(as_text=True))
    generated, _ = run(client, redis_client, "/generate", body)
    tokens = [e["data"] for e in events if e["event"] == "token"]
    assert generated.json["output_text"] == "".join(token["text"] for token in tokens) == "Hello, world"
    assert generated.json["output_ids"] == [token["token"] for token in tokens]


@pytest.mark.parametrize(("error_type", "status"), [
    ("internal_error", 500),
    ("cancelled", 409),
    ("job_lost", 502),
    ("invalid_job", 422),
    ("timeout", 504),
    ("context_length_exceeded", 400),
    ("something_new", 500),
])
def test_a_job_error_becomes_an_error_response(client, redis_client, live_worker, error_type, status):
    live_worker("cpu")
    error = {"type": error_type, "message": "the worker says no"}
    response, _ = run(client, redis_client, "/generate", {"prompt": PROMPT}, error=error)
    assert response.status_code == status
    assert response.json == {"error": error}


def test_a_job_error_ends_the_stream_with_an_error_event(client, redis_client, live_worker):
    live_worker("cpu")
    error = {"type": "internal_error", "message": "out of memory"}
    response, _ = run(client, redis_client, "/stream", {"prompt": PROMPT}, error=error)
    events, _ = parse_sse(response.get_data(as_text=True))
    assert [(e["id"], e["event"], e["data"]) for e in events] == [(1, "error", {"error": error})]
