"""The /v1 routes end to end, used as a user would: the official `openai` client against gunicorn + a real
CPU worker + real Redis, streaming and not."""

from __future__ import annotations

import openai
import pytest
import requests

pytestmark = [pytest.mark.integration, pytest.mark.model]

MESSAGES = [{"role": "user", "content": "Name one colour of the sky."}]


@pytest.fixture(scope="module")
def client(service) -> openai.OpenAI:
    return openai.OpenAI(base_url=service.url("/v1"), api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client) -> str:
    models = client.models.list().data
    assert len(models) == 1
    return models[0].id


def test_completion_matches_native_generate_for_greedy_decoding(client, model, service):
    completion = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8,
                                           temperature=0)
    native = requests.post(service.url("/generate"), json={"prompt": "The capital of France is", "max_tokens": 8,
                                                            "temperature": 0}, timeout=120).json()
    choice = completion.choices[0]
    assert completion.object == "text_completion" and completion.model == model
    assert choice.text == native["output_text"] and choice.text.strip()
    assert choice.finish_reason == {"eos": "stop", "stop": "stop", "length": "length"}[native["finish_reason"]]
    assert completion.usage.completion_tokens == len(native["output_ids"])
    assert completion.usage.prompt_tokens == native["usage"]["prompt_tokens"]


def test_streamed_completion_concatenates_to_the_whole_one(client, model):
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0}
    whole = client.completions.create(**body).choices[0]
    chunks = list(client.completions.create(**body, stream=True, stream_options={"include_usage": True}))
    assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == whole.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_chat_completion(client, model):
    chat = client.chat.completions.create(model=model, messages=MESSAGES, max_completion_tokens=16, temperature=0)
    reply = chat.choices[0]
    assert chat.object == "chat.completion" and reply.message.role == "assistant"
    assert reply.message.content.strip() and reply.finish_reason in ("stop", "length")
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens


def test_streamed_chat_completion_equals_the_whole_one(client, model):
    body = {"model": model, "messages": MESSAGES, "max_tokens": 16, "temperature": 0}
    whole = client.chat.completions.create(**body).choices[0]
    with client.chat.completions.create(**body, stream=True) as stream:
        chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == whole.message.content
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason


def test_unsupported_fields_are_refused_with_openai_errors(client, model):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=model, messages=MESSAGES, n=3)
    assert raised.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=model, messages=MESSAGES,
                                       tools=[{"type": "function", "function": {"name": "f"}}])
    assert raised.value.body["param"] == "tools" and raised.value.body["type"] == "invalid_request_error"
