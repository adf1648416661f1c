"""OpenAI-compatible routes: the official `openai` client against the app (in-process, over WSGI), the
raw chunk shapes, and OpenAI-shaped errors for what the server does not support."""

from __future__ import annotations

import json

import httpx2  # the openai client's HTTP library: its WSGI transport runs the Flask app in-process
import openai
import pytest

from api.openai.format import ChunkEncoder, TextCompletionView
from shared.events import Event, cancel_key
from shared.model_files import model_name
from shared.protocol import TokenEvent
from shared.tokenizer import load_tokenizer
from tests.fixtures_jobs import ScriptedWorker, queued_jobs
from tests.sse_client import parse_lines

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}]


@pytest.fixture
def openai_client(app):
    """The official client, talking to the app through WSGI (no sockets)."""
    http = httpx2.Client(transport=httpx2.WSGITransport(app=app), base_url="http://api.test")
    return openai.OpenAI(base_url="http://api.test/v1", api_key="unused", http_client=http, max_retries=0)


@pytest.fixture
def served(app_config) -> str:
    return model_name(app_config["MODEL_DIR"])


def serve(redis_client, **options) -> ScriptedWorker:
    worker = ScriptedWorker(redis_client, "cpu", **options)
    worker.start()
    return worker


def data_frames(body: str) -> list[str]:
    """The `data:` payloads of an OpenAI stream, in order."""
    return [event.data for event in parse_lines(body.split("\n"), decode=None)]


def test_models_lists_the_served_model(openai_client, served):
    assert [model.id for model in openai_client.models.list().data] == [served]


def test_completion_with_the_openai_client(openai_client, redis_client, live_worker, served, app_config):
    live_worker("cpu")
    worker = serve(redis_client)
    completion = openai_client.completions.create(model=served, prompt="The capital of France is", max_tokens=3,
                                                  temperature=0.5, top_p=0.9, seed=7, stop=["\n"])
    payload = worker.finish()
    assert completion.object == "text_completion" and completion.model == served
    assert completion.id == f"cmpl-{payload['job_id']}"
    assert completion.choices[0].text == "Hello, world" and completion.choices[0].finish_reason == "length"
    prompt_ids = load_tokenizer(app_config["MODEL_DIR"]).encode("The capital of France is")
    assert payload["prompt_ids"] == prompt_ids
    assert payload["sampling"] == {"max_tokens": 3, "temperature": 0.5, "top_k": 0, "top_p": 0.9,
                                   "repetition_penalty": 1.0, "seed": 7, "stop": ["\n"]}
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (len(prompt_ids), 3)
    assert completion.usage.total_tokens == len(prompt_ids) + 3


def test_chat_completion_renders_the_chat_template(openai_client, redis_client, live_worker, app_config):
    live_worker("cpu")
    worker = serve(redis_client)
    chat = openai_client.chat.completions.create(model=model_name(app_config["MODEL_DIR"]), messages=CHAT,
                                                 max_completion_tokens=10)
    payload = worker.finish()
    assert chat.object == "chat.completion" and chat.id == f"chatcmpl-{payload['job_id']}"
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == "Hello, world!"
    assert chat.choices[0].finish_reason == "stop"  # the script ended with EOS
    assert payload["prompt_ids"] == load_tokenizer(app_config["MODEL_DIR"]).encode_chat(CHAT)
    assert payload["sampling"]["max_tokens"] == 10


def test_streamed_chat_with_the_openai_client(openai_client, redis_client, live_worker):
    live_worker("cpu")
    worker = serve(redis_client)
    chunks = list(openai_client.chat.completions.create(messages=CHAT, model=openai.omit, stream=True,
                                                        stream_options={"include_usage": True}, max_tokens=3))
    worker.finish()
    assert {chunk.object for chunk in chunks} == {"chat.completion.chunk"}
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == "Hello, world"
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3


def test_streamed_completion_with_the_openai_client(openai_client, redis_client, live_worker):
    live_worker("cpu")
    worker = serve(redis_client)
    chunks = list(openai_client.completions.create(model=openai.omit, prompt="Hello", stream=True, max_tokens=8))
    worker.finish()
    assert {chunk.object for chunk in chunks} == {"text_completion"}
    assert "".join(chunk.choices[0].text for chunk in chunks) == "Hello, world!"
    assert chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].choices[0].text == ""
    assert all(chunk.usage is None for chunk in chunks)  # no include_usage: no usage chunk


def test_stream_frames_are_shaped_as_openai_s(client, redis_client, live_worker):
    live_worker("cpu")
    worker = serve(redis_client)
    response = client.post("/v1/chat/completions", json={"messages": CHAT, "stream": True, "max_tokens": 2,
                                                          "stream_options": {"include_usage": True}})
    payload = worker.finish()
    assert response.status_code == 200 and response.mimetype == "text/event-stream"
    assert response.headers["X-Job-Id"] == payload["job_id"]
    frames = data_frames(response.get_data(as_text=True))
    assert frames[-1] == "[DONE]"
    chunks = [json.loads(frame) for frame in frames[:-1]]
    assert [chunk["choices"][0]["delta"] if chunk["choices"] else None for chunk in chunks] == [
        {"role": "assistant", "content": ""}, {"content": "Hello"}, {"content": ","}, {}, None]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"] == {"prompt_tokens": len(payload["prompt_ids"]), "completion_tokens": 2,
                                   "total_tokens": len(payload["prompt_ids"]) + 2}
    assert {chunk["id"] for chunk in chunks} == {f"chatcmpl-{payload['job_id']}"}


@pytest.mark.parametrize(("ours", "openai_s"), [("eos", "stop"), ("stop", "stop"), ("length", "length")])
@pytest.mark.parametrize("stream", [False, True])
def test_finish_reasons_map_to_openai_s(client, redis_client, live_worker, ours, openai_s, stream):
    live_worker("cpu")
    worker = serve(redis_client, finish_reason=ours)
    response = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "stream": stream})
    worker.finish()
    if stream:
        last = json.loads(data_frames(response.get_data(as_text=True))[-2])
    else:
        last = response.json
    assert last["choices"][0]["finish_reason"] == openai_s


def test_leaving_a_stream_cancels_its_job(client, redis_client, live_worker):
    live_worker("cpu")  # registered, but nothing takes the job: it stays queued
    response = client.post("/v1/completions", json={"prompt": "Hello", "stream": True}, buffered=False)
    job_id = response.headers["X-Job-Id"]
    assert next(response.iter_encoded()) == b": keep-alive\n\n"
    response.close()  # what the server does when the client has gone
    assert redis_client.get(cancel_key(job_id)) == b"1"
    assert queued_jobs(redis_client) == 0
    assert client.get(f"/jobs/{job_id}").json["status"] == "canceled"


BAD_REQUESTS = [
    pytest.param("/v1/completions", {"prompt": "hi", "n": 2}, "n", id="n-above-1"),
    pytest.param("/v1/completions", {"prompt": "hi", "best_of": 3}, "best_of", id="best-of"),
    pytest.param("/v1/completions", {"prompt": "hi", "echo": True}, "echo", id="echo"),
    pytest.param("/v1/completions", {"prompt": "hi", "logprobs": 2}, "logprobs", id="completion-logprobs"),
    pytest.param("/v1/completions", {"prompt": ["a", "b"]}, "prompt", id="prompt-list"),
    pytest.param("/v1/completions", {"prompt": "hi", "suffix": "!"}, "suffix", id="suffix"),
    pytest.param("/v1/completions", {"prompt": "hi", "temperature": 3}, "temperature", id="temperature"),
    pytest.param("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens", id="max-tokens-zero"),
    pytest.param("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options",
                 id="stream-options-without-stream"),
    pytest.param("/v1/chat/completions", {"messages": []}, "messages", id="no-messages"),
    pytest.param("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, "messages", id="tool-role"),
    pytest.param("/v1/chat/completions", {"messages": CHAT, "tools": []}, "tools", id="tools"),
    pytest.param("/v1/chat/completions", {"messages": CHAT, "response_format": {"type": "json_object"}},
                 "response_format", id="response-format"),
    pytest.param("/v1/chat/completions", {"messages": CHAT, "presence_penalty": 0.5}, "presence_penalty",
                 id="presence-penalty"),
    pytest.param("/v1/chat/completions", {"messages": CHAT, "logprobs": True}, "logprobs", id="chat-logprobs"),
    pytest.param("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 65}, "max_completion_tokens",
                 id="max-completion-tokens-above-limit"),
    pytest.param("/v1/chat/completions", {"messages": CHAT, "max_tokens": 4, "max_completion_tokens": 4},
                 "max_completion_tokens", id="both-max-tokens"),
]


@pytest.mark.parametrize(("path", "body", "param"), BAD_REQUESTS)
def test_unsupported_or_bad_fields_get_a_400_in_openai_s_shape(client, redis_client, live_worker, path, body, param):
    live_worker("cpu")
    response = client.post(path, json=body)
    assert response.status_code == 400
    error = response.json["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert param in error["message"]
    assert queued_jobs(redis_client) == 0


def test_the_openai_client_sees_a_bad_request_error(openai_client, live_worker):
    live_worker("cpu")
    with pytest.raises(openai.BadRequestError) as raised:
        openai_client.chat.completions.create(messages=CHAT, model=openai.omit, n=2)
    assert raised.value.body["param"] == "n" and "'n'" in raised.value.body["message"]


def test_an_unknown_model_is_a_404_naming_it(openai_client, live_worker, served):
    live_worker("cpu")
    with pytest.raises(openai.NotFoundError) as raised:
        openai_client.completions.create(model="gpt-4o", prompt="hi")
    assert raised.value.body["code"] == "model_not_found" and served in raised.value.body["message"]


def test_a_prompt_beyond_the_context_is_refused(client, live_worker):
    live_worker("cpu")
    response = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "word " * 200}]})
    assert response.status_code == 400
    assert response.json["error"]["code"] == "context_length_exceeded"
    assert response.json["error"]["param"] == "messages"


def test_no_live_worker_is_a_503_server_error(client):
    response = client.post("/v1/completions", json={"prompt": "hi"})
    assert response.status_code == 503
    assert response.json["error"]["type"] == "server_error" and response.json["error"]["code"] == "no_worker"


def test_malformed_json_and_unknown_routes_answer_in_openai_s_shape(client):
    malformed = client.post("/v1/completions", data=b"{nope", content_type="application/json")
    assert malformed.status_code == 400 and malformed.json["error"]["param"] == "body"
    missing = client.get("/v1/embeddings")
    assert missing.status_code == 404 and missing.json["error"]["type"] == "invalid_request_error"


def test_a_job_error_mid_stream_is_an_error_chunk(openai_client, redis_client, live_worker):
    live_worker("cpu")
    worker = serve(redis_client, error={"type": "internal_error", "message": "out of memory"})
    with pytest.raises(openai.APIError, match="out of memory"):
        list(openai_client.completions.create(model=openai.omit, prompt="Hello", stream=True))
    worker.finish()


def test_a_job_error_without_stream_is_an_error_answer(client, redis_client, live_worker):
    live_worker("cpu")
    worker = serve(redis_client, error={"type": "cancelled", "message": "the job was cancelled"})
    response = client.post("/v1/chat/completions", json={"messages": CHAT})
    worker.finish()
    assert response.status_code == 409
    assert response.json == {"error": {"message": "the job was cancelled", "type": "invalid_request_error",
                                       "param": None, "code": "cancelled"}}


def test_a_token_without_text_sends_no_chunk():
    encoder = ChunkEncoder(TextCompletionView("job", "model", 0), include_usage=False)
    assert encoder.event(Event.of(1, TokenEvent(token=2, text="", index=0))) == ""
    frame = encoder.event(Event.of(2, TokenEvent(token=3, text="é", index=1)))
    assert json.loads(frame.removeprefix("data: "))["choices"][0]["text"] == "é"
