"""Bad generation requests get a 400 JSON error naming the field, and no job is created."""

from __future__ import annotations

import json

import pytest

from tests.fixtures_jobs import ScriptedWorker, queued_jobs

BAD_BODIES = [
    pytest.param(b"{not json", "body", id="malformed-json"),
    pytest.param(b"", "body", id="empty-body"),
    pytest.param(b'["a prompt"]', "body", id="array-body"),
    pytest.param(b'"a prompt"', "body", id="string-body"),
    pytest.param(b'{"prompt": "hi", "temperature": NaN}', "body", id="nan"),
    pytest.param({"prompt": "hi", "colour": "red", "author": "me"}, "author", id="unknown-fields"),
    pytest.param({}, "prompt", id="missing-prompt"),
    pytest.param({"prompt": ""}, "prompt", id="empty-prompt"),
    pytest.param({"prompt": 42}, "prompt", id="prompt-not-string"),
    pytest.param({"prompt": ["hi"]}, "prompt", id="prompt-list"),
    pytest.param({"prompt": "hi", "max_tokens": "10"}, "max_tokens", id="max-tokens-string"),
    pytest.param({"prompt": "hi", "max_tokens": 2.5}, "max_tokens", id="max-tokens-float"),
    pytest.param({"prompt": "hi", "max_tokens": True}, "max_tokens", id="max-tokens-bool"),
    pytest.param({"prompt": "hi", "max_tokens": 0}, "max_tokens", id="max-tokens-zero"),
    pytest.param({"prompt": "hi", "max_tokens": 65}, "max_tokens", id="max-tokens-above-limit"),
    pytest.param({"prompt": "hi", "temperature": -1}, "temperature", id="temperature-negative"),
    pytest.param({"prompt": "hi", "temperature": 3}, "temperature", id="temperature-too-high"),
    pytest.param({"prompt": "hi", "temperature": "hot"}, "temperature", id="temperature-string"),
    pytest.param({"prompt": "hi", "top_k": -1}, "top_k", id="top-k-negative"),
    pytest.param({"prompt": "hi", "top_p": 0}, "top_p", id="top-p-zero"),
    pytest.param({"prompt": "hi", "repetition_penalty": 0}, "repetition_penalty", id="penalty-zero"),
    pytest.param({"prompt": "hi", "repetition_penalty": 1e-300}, "repetition_penalty", id="penalty-degenerate"),
    pytest.param(b'{"prompt": "hi", "stop": ' + b"[" * 1000 + b"]" * 1000 + b"}", "body", id="deep-nesting"),
    pytest.param({"prompt": "hi", "seed": -5}, "seed", id="seed-negative"),
    pytest.param({"prompt": "hi", "stop": 7}, "stop", id="stop-number"),
    pytest.param({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop", id="too-many-stops"),
    pytest.param({"prompt": "hi", "backend": "tpu"}, "backend", id="unknown-backend"),
    pytest.param({"prompt": "hi", "backend": 1}, "backend", id="backend-not-string"),
]


def test_numbers_are_compared_by_value_as_json_schema_does(client, redis_client, live_worker):
    """4.0 is the integer 4 (JSON Schema's `integer`, which the document says), and 1 the number 1.0."""
    live_worker("cpu")
    worker = ScriptedWorker(redis_client, "cpu")
    worker.start()
    response = post(client, "/generate", b'{"prompt": "hi", "max_tokens": 4.0, "top_k": 5.0, "seed": 1e3, '
                                         b'"temperature": 1, "top_p": 1}')
    sampling = worker.finish()["sampling"]
    assert response.status_code == 200, response.json
    assert (sampling["max_tokens"], sampling["top_k"], sampling["seed"]) == (4, 5, 1000)
    assert (sampling["temperature"], sampling["top_p"]) == (1.0, 1.0)


def post(client, path: str, body) -> object:
    data = body if isinstance(body, bytes) else json.dumps(body)
    return client.post(path, data=data, content_type="application/json")


@pytest.mark.parametrize("path", ["/generate", "/stream"])
@pytest.mark.parametrize(("body", "field"), BAD_BODIES)
def test_bad_request_is_a_400_naming_the_field(client, redis_client, live_worker, path, body, field):
    live_worker("cpu")
    response = post(client, path, body)
    assert response.status_code == 400
    assert response.is_json
    error = response.json["error"]
    assert error["type"] == "invalid_request"
    assert error["field"] == field
    assert error["message"]
    assert queued_jobs(redis_client) == 0


def test_unknown_fields_are_all_listed(client, live_worker):
    live_worker("cpu")
    response = post(client, "/generate", {"prompt": "hi", "colour": "red", "author": "me"})
    message = response.json["error"]["message"]
    assert "'colour'" in message and "'author'" in message


@pytest.mark.parametrize(("prompt", "max_tokens"), [
    pytest.param("word " * 200, 1, id="prompt-alone-too-long"),
    pytest.param("word " * 100, 60, id="prompt-plus-max-tokens-too-long"),
])
def test_prompt_that_does_not_fit_the_context_is_refused(client, redis_client, live_worker, prompt, max_tokens):
    live_worker("cpu")
    response = post(client, "/generate", {"prompt": prompt, "max_tokens": max_tokens})
    assert response.status_code == 400
    error = response.json["error"]
    assert error["type"] == "context_length_exceeded"
    assert error["field"] == "prompt"
    assert "128" in error["message"]  # the context limit (MAX_SEQ_LEN) is named
    assert queued_jobs(redis_client) == 0


def test_unknown_route_and_wrong_method_answer_in_the_error_shape(client):
    missing = client.get("/nowhere")
    assert missing.status_code == 404
    assert missing.json["error"]["type"] == "not_found"
    wrong_method = client.get("/generate")
    assert wrong_method.status_code == 405
    assert wrong_method.json["error"]["type"] == "method_not_allowed"
    assert "POST" in wrong_method.headers["Allow"]


def test_oversized_body_is_a_413_in_the_error_shape(client):
    response = client.post("/generate", data=b"x" * (2 << 20), content_type="application/json")
    assert response.status_code == 413
    assert response.json["error"]["type"] == "request_entity_too_large"


@pytest.mark.parametrize("path", ["/tokenize", "/generate_batch", "/chat", "/v1/chat/completions", "/v1/completions"])
def test_deeply_nested_bodies_are_a_400_on_every_route(client, live_worker, path):
    live_worker("cpu")
    response = post(client, path, b'{"a": ' + b"[" * 1000 + b"]" * 1000 + b"}")
    assert response.status_code == 400
    error = response.json["error"]
    assert (error.get("field") or error.get("param")) == "body"
