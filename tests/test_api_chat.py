"""`POST /chat`: conversations in either form become the chat-templated prompt; bad shapes are 400s naming
the message; a history too long for the context loses its oldest pairs, and says so."""

from __future__ import annotations

import pytest

from shared.tokenizer import load_tokenizer
from tests.fixtures_jobs import ScriptedWorker, queued_jobs
from tests.sse_client import parse_sse

QUESTION = "What is the capital of France?"


def run(client, redis_client, path: str, body: dict):
    """POST `body` while a scripted CPU worker serves the job; (response, job payload)."""
    worker = ScriptedWorker(redis_client, "cpu")
    worker.start()
    response = client.post(path, json=body)
    return response, worker.finish()


def encode_chat(app, turns: list[dict]) -> list[int]:
    return load_tokenizer(app.config["MODEL_DIR"]).encode_chat(turns)


@pytest.mark.parametrize(("messages", "turns"), [
    pytest.param([QUESTION], [{"role": "user", "content": QUESTION}], id="one-string"),
    pytest.param(["Hello", "Hi! How can I help?", "Tell me a story."],
                 [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi! How can I help?"},
                  {"role": "user", "content": "Tell me a story."}], id="strings-alternate"),
    pytest.param([{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello"}],
                 [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello"}],
                 id="objects-with-system"),
    pytest.param(["Hello", "Tell me a story."],
                 [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Tell me a story."}],
                 id="ending-with-an-assistant-turn"),
])
def test_both_forms_become_the_chat_templated_prompt(app, client, redis_client, live_worker, messages, turns):
    live_worker("cpu")
    response, payload = run(client, redis_client, "/chat", {"messages": messages, "max_tokens": 3, "temperature": 0})
    assert response.status_code == 200 and response.mimetype == "text/event-stream"
    assert payload["prompt_ids"] == encode_chat(app, turns)
    assert payload["kind"] == "generate"
    assert payload["sampling"]["max_tokens"] == 3 and payload["sampling"]["temperature"] == 0
    assert response.headers["X-Messages-Dropped"] == "0"


def test_chat_streams_like_stream(client, redis_client, live_worker):
    live_worker("cpu")
    response, payload = run(client, redis_client, "/chat", {"messages": [QUESTION], "max_tokens": 3})
    assert response.headers["X-Job-Id"] == payload["job_id"]
    events, _ = parse_sse(response.get_data(as_text=True))
    assert [(e["id"], e["event"]) for e in events] == [(1, "token"), (2, "token"), (3, "token"), (4, "done")]
    assert events[-1]["data"]["output_text"] == "Hello, world"


BAD_CHATS = [
    pytest.param({}, "messages", "'messages' is required", id="missing"),
    pytest.param({"messages": []}, "messages", "'messages'", id="empty-list"),
    pytest.param({"messages": "Hello"}, "messages", "a list", id="not-a-list"),
    pytest.param({"messages": ["Hello", {"role": "assistant", "content": "Hi"}]}, "messages", "'messages[1]'",
                 id="mixed-forms"),
    pytest.param({"messages": [{"role": "user", "content": "Hi"}, "Hello"]}, "messages", "'messages[1]'",
                 id="mixed-forms-object-first"),
    pytest.param({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "messages",
                 "'messages[1].role'", id="two-user-turns"),
    pytest.param({"messages": [{"role": "assistant", "content": "a"}]}, "messages", "'messages[0].role'",
                 id="assistant-first"),
    pytest.param({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                               {"role": "system", "content": "c"}]}, "messages", "'messages[2].role'",
                 id="late-system"),
    pytest.param({"messages": [{"role": "system", "content": "Be brief."}]}, "messages", "user turn",
                 id="only-system"),
    pytest.param({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                               {"role": "robot", "content": "c"}]}, "messages", "'messages[2].role'",
                 id="unknown-role"),
    pytest.param({"messages": ["Hello", ""]}, "messages", "'messages[1]'", id="empty-string"),
    pytest.param({"messages": ["   "]}, "messages", "'messages[0]' must not be blank", id="blank-string"),
    pytest.param({"messages": [{"role": "user", "content": ""}]}, "messages", "'messages[0].content'",
                 id="empty-content"),
    pytest.param({"messages": [{"role": "user"}]}, "messages", "'messages[0].content' is required",
                 id="missing-content"),
    pytest.param({"messages": [{"role": "user", "content": "a", "name": "x"}]}, "messages", "'messages[0].name'",
                 id="unknown-message-field"),
    pytest.param({"messages": [5]}, "messages", "'messages[0]'", id="number-message"),
    pytest.param({"messages": ["Hi"], "max_tokens": 0}, "max_tokens", "'max_tokens'", id="max-tokens-zero"),
    pytest.param({"messages": ["Hi"], "temperature": 3}, "temperature", "'temperature'", id="temperature"),
    pytest.param({"messages": ["Hi"], "backend": "tpu"}, "backend", "'backend'", id="backend"),
    pytest.param({"messages": ["Hi"], "prompt": "Hi"}, "prompt", "'prompt'", id="unknown-field"),
]


@pytest.mark.parametrize(("body", "field", "named"), BAD_CHATS)
def test_bad_conversations_are_400s_naming_the_message(client, redis_client, live_worker, body, field, named):
    live_worker("cpu")
    response = client.post("/chat", json=body)
    assert response.status_code == 400, response.json
    error = response.json["error"]
    assert error["type"] == "invalid_request" and error["field"] == field
    assert named in error["message"]
    assert queued_jobs(redis_client) == 0


def long_history(pairs: int) -> list[dict]:
    """A system message, `pairs` user/assistant pairs of about 20 tokens each, then a last user turn."""
    turns = [{"role": "system", "content": "Be brief."}]
    for n in range(pairs):
        turns += [{"role": "user", "content": f"Question {n}: " + "tell me more about the sea " * 3},
                  {"role": "assistant", "content": f"Answer {n}: " + "the sea is wide and deep " * 3}]
    return turns + [{"role": "user", "content": "And the sky?"}]


def test_a_long_history_loses_its_oldest_pairs_and_says_how_many(app, client, redis_client, live_worker):
    live_worker("cpu")  # MAX_SEQ_LEN is 128 in these tests
    turns = long_history(6)
    response, payload = run(client, redis_client, "/chat", {"messages": turns, "max_tokens": 16})
    dropped = int(response.headers["X-Messages-Dropped"])
    assert dropped > 0 and dropped % 2 == 0
    kept = [turns[0]] + turns[1 + dropped:]
    assert payload["prompt_ids"] == encode_chat(app, kept)
    assert len(payload["prompt_ids"]) + 16 <= 128
    # the fewest: keeping one more pair would not fit
    assert len(encode_chat(app, [turns[0]] + turns[dropped - 1:])) + 16 > 128


def test_a_last_turn_too_long_for_the_context_is_a_400(client, redis_client, live_worker):
    live_worker("cpu")
    turns = long_history(2)
    turns[-1] = {"role": "user", "content": "word " * 200}
    response = client.post("/chat", json={"messages": turns})
    assert response.status_code == 400
    error = response.json["error"]
    assert error["type"] == "context_length_exceeded" and error["field"] == "messages"
    assert "128" in error["message"] and "last user turn" in error["message"]
    assert queued_jobs(redis_client) == 0
