"""`POST /stream_chat_beam` (BEAM job: candidates, the winner's tokens, done) and `POST /rerank_scores`
(SCORE job, answered once done): the jobs the API enqueues, the events it relays, and bad input."""

from __future__ import annotations

import pytest

from shared.tokenizer import load_tokenizer
from tests.fixtures_jobs import ScriptedWorker, queued_jobs, score_rows
from tests.sse_client import parse_sse

CHAT = ["Hello", "Hi! How can I help?", "What is the capital of France?"]
TURNS = [{"role": "user", "content": CHAT[0]}, {"role": "assistant", "content": CHAT[1]},
         {"role": "user", "content": CHAT[2]}]
CONVERSATION_TEXT = "user: Hello\nassistant: Hi! How can I help?\nuser: What is the capital of France?"


def run(client, redis_client, path: str, body: dict, error: dict | None = None):
    """POST `body` while a scripted CPU worker serves the job; (response, job payload)."""
    worker = ScriptedWorker(redis_client, "cpu", error=error)
    worker.start()
    response = client.post(path, json=body)
    return response, worker.finish()


@pytest.mark.parametrize("use_rerank", [True, False])
def test_beam_relays_candidates_then_the_winner_s_tokens_then_done(app, client, redis_client, live_worker,
                                                                  use_rerank):
    live_worker("cpu")
    body = {"messages": CHAT, "beam_width": 3, "use_rerank": use_rerank}
    response, payload = run(client, redis_client, "/stream_chat_beam", body)
    assert response.status_code == 200 and response.mimetype == "text/event-stream"
    assert response.headers["X-Job-Id"] == payload["job_id"] and response.headers["X-Messages-Dropped"] == "0"
    events, _ = parse_sse(response.get_data(as_text=True))
    kinds = [e["event"] for e in events]
    assert kinds == ["candidates"] + ["token"] * (len(events) - 2) + ["done"]
    assert [e["id"] for e in events] == list(range(1, len(events) + 1))
    listed, done = events[0]["data"], events[-1]["data"]
    assert len(listed["candidates"]) == 3 and listed["use_rerank"] is use_rerank
    best = max(listed["candidates"], key=lambda c: c["combined_score"])
    assert done["winner"] == listed["winner"] == best["index"]
    assert (best["index"] == 0) is (not use_rerank)  # the scripted reranker prefers a later beam
    text = "".join(e["data"]["text"] for e in events[1:-1])
    assert text == done["output_text"] == best["text"]


def test_beam_enqueues_a_beam_job_on_the_chat_templated_prompt(app, client, redis_client, live_worker):
    live_worker("cpu")
    body = {"messages": CHAT, "beam_width": 2, "max_tokens": 5, "length_penalty": 0.5, "use_rerank": False}
    _, payload = run(client, redis_client, "/stream_chat_beam", body)
    assert payload["kind"] == "beam"
    assert payload["prompt_ids"] == load_tokenizer(app.config["MODEL_DIR"]).encode_chat(TURNS)
    assert payload["sampling"]["max_tokens"] == 5
    assert payload["beam"] == {"beam_width": 2, "length_penalty": 0.5, "use_rerank": False,
                               "context": CONVERSATION_TEXT}


def test_beam_defaults(client, redis_client, live_worker):
    live_worker("cpu")
    _, payload = run(client, redis_client, "/stream_chat_beam", {"messages": CHAT})
    assert payload["beam"] == {"beam_width": 4, "length_penalty": 1.0, "use_rerank": True, "context": CONVERSATION_TEXT}
    assert payload["sampling"]["max_tokens"] == 32  # DEFAULT_MAX_TOKENS


BAD_BEAMS = [
    pytest.param({"messages": CHAT, "beam_width": 0}, "beam_width", id="width-zero"),
    pytest.param({"messages": CHAT, "beam_width": 9}, "beam_width", id="width-nine"),
    pytest.param({"messages": CHAT, "beam_width": "4"}, "beam_width", id="width-string"),
    pytest.param({"messages": CHAT, "max_tokens": 65}, "max_tokens", id="max-tokens-above-limit"),
    pytest.param({"messages": CHAT, "length_penalty": 9}, "length_penalty", id="length-penalty"),
    pytest.param({"messages": CHAT, "use_rerank": "yes"}, "use_rerank", id="use-rerank-string"),
    pytest.param({"messages": CHAT, "temperature": 0.7}, "temperature", id="temperature-refused"),
    pytest.param({"messages": ["Hi", {"role": "user", "content": "x"}]}, "messages", id="mixed-forms"),
    pytest.param({"beam_width": 2}, "messages", id="no-messages"),
]


@pytest.mark.parametrize(("body", "field"), BAD_BEAMS)
def test_bad_beam_requests_are_400s(client, redis_client, live_worker, body, field):
    live_worker("cpu")
    response = client.post("/stream_chat_beam", json=body)
    assert response.status_code == 400
    assert response.json["error"]["field"] == field
    assert queued_jobs(redis_client) == 0


CANDIDATES = ["The capital of France is Paris.", "Paris.", "I like turtles."]


def test_rerank_scores_answers_with_the_worker_s_scores(app, client, redis_client, live_worker):
    live_worker("cpu")
    body = {"messages": CHAT, "candidates": CANDIDATES, "length_penalty": 0.8}
    response, payload = run(client, redis_client, "/rerank_scores", body)
    assert response.status_code == 200, response.json
    rows = [row.model_dump() for row in score_rows(CANDIDATES)]
    assert response.json == {"job_id": payload["job_id"], "candidates": rows, "winner": 0}
    assert response.headers["X-Job-Id"] == payload["job_id"]
    tokenizer = load_tokenizer(app.config["MODEL_DIR"])
    assert payload["kind"] == "score" and payload["prompt_ids"] == tokenizer.encode_chat(TURNS)
    assert payload["score"] == {"candidates": CANDIDATES, "context": CONVERSATION_TEXT, "length_penalty": 0.8}
    longest = max(len(tokenizer.backend.encode(c, add_special_tokens=False).ids) for c in CANDIDATES)
    assert payload["sampling"]["max_tokens"] == longest


def test_a_scoring_job_error_is_an_error_answer(client, redis_client, live_worker):
    live_worker("cpu")
    error = {"type": "invalid_job", "message": "too long for the worker"}
    response, _ = run(client, redis_client, "/rerank_scores", {"messages": CHAT, "candidates": ["a"]}, error=error)
    assert response.status_code == 422 and response.json == {"error": error}


BAD_SCORES = [
    pytest.param({"messages": CHAT}, "candidates", "'candidates' is required", id="no-candidates"),
    pytest.param({"messages": CHAT, "candidates": []}, "candidates", "'candidates'", id="empty-list"),
    pytest.param({"messages": CHAT, "candidates": ["a"] * 9}, "candidates", "'candidates'", id="nine"),
    pytest.param({"messages": CHAT, "candidates": ["a", ""]}, "candidates", "'candidates[1]'", id="empty-text"),
    pytest.param({"messages": CHAT, "candidates": "Paris"}, "candidates", "a list", id="not-a-list"),
    pytest.param({"messages": CHAT, "candidates": [1]}, "candidates", "'candidates[0]'", id="not-text"),
    pytest.param({"messages": CHAT, "candidates": ["a"], "length_penalty": "1"}, "length_penalty",
                 "'length_penalty'", id="penalty-string"),
    pytest.param({"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}],
                  "candidates": ["a"]}, "messages", "'messages[1].role'", id="bad-role"),
    pytest.param({"messages": CHAT, "candidates": ["word " * 200]}, "messages", "longest candidate",
                 id="candidate-too-long"),
]


@pytest.mark.parametrize(("body", "field", "named"), BAD_SCORES)
def test_bad_scoring_requests_are_400s(client, redis_client, live_worker, body, field, named):
    live_worker("cpu")
    response = client.post("/rerank_scores", json=body)
    assert response.status_code == 400
    assert response.json["error"]["field"] == field and named in response.json["error"]["message"]
    assert queued_jobs(redis_client) == 0


def test_the_beam_routes_are_documented_with_their_events(client):
    document = client.get("/openapi.json").json
    stream = document["paths"]["/stream_chat_beam"]["post"]["responses"]["200"]
    events = stream["content"]["text/event-stream"]["x-events"]
    assert events == {name: {"$ref": f"#/components/schemas/{model}"} for name, model in [
        ("candidates", "CandidatesEvent"), ("token", "TokenEvent"), ("done", "BeamDoneEvent"), ("error", "ErrorBody")]}
    assert "X-Messages-Dropped" in stream["headers"]
    assert "conversation as text" in document["components"]["schemas"]["BeamBody"]["properties"]["use_rerank"][
        "description"]
