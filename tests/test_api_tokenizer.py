"""`POST /tokenize` and `POST /detokenize`: ids of text or of a chat, text of ids, and the round trip."""

from __future__ import annotations

import pytest

from shared.tokenizer import load_tokenizer

TEXTS = [
    pytest.param("The quick brown fox jumps over the lazy dog.", id="english"),
    pytest.param("Où est la bibliothèque ? L'élève naïve a goûté la crème brûlée.", id="french"),
    pytest.param("Größere Straßen führen über die Brücke.", id="german"),
    pytest.param("我们明天去北京看长城。", id="chinese"),
    pytest.param("こんにちは、世界。カタカナとひらがな。", id="japanese"),
    pytest.param("Party time 🎉👍🏽 family 👨‍👩‍👧 flag 🇫🇷", id="emoji"),
    pytest.param("  leading spaces,\ttabs\nand new lines\n", id="whitespace"),
]


@pytest.mark.parametrize("text", TEXTS)
def test_detokenize_of_tokenize_gives_the_text_back(client, text):
    tokenized = client.post("/tokenize", json={"text": text})
    assert tokenized.status_code == 200
    body = tokenized.json
    assert body["count"] == len(body["ids"]) == len(body["tokens"]) > 0
    detokenized = client.post("/detokenize", json={"ids": body["ids"]})
    assert detokenized.status_code == 200
    assert detokenized.json == {"text": text}


def test_tokenize_gives_the_model_s_ids_and_vocabulary_entries(client, app_config):
    tokenizer = load_tokenizer(app_config["MODEL_DIR"])
    body = client.post("/tokenize", json={"text": "Hello world"}).json
    assert body["ids"] == tokenizer.encode("Hello world")
    assert body["tokens"] == ["Hello", "Ġworld"]
    assert body["text"] == "Hello world"


def test_tokenize_messages_shows_the_chat_templated_prompt(client, app_config):
    messages = [{"role": "user", "content": "Hi there"}]
    body = client.post("/tokenize", json={"messages": messages}).json
    tokenizer = load_tokenizer(app_config["MODEL_DIR"])
    assert body["ids"] == tokenizer.encode_chat(messages)
    assert body["text"].startswith("<|im_start|>") and "Hi there" in body["text"]
    assert body["text"].endswith("<|im_start|>assistant\n")  # the assistant's turn is opened
    assert client.post("/detokenize", json={"ids": body["ids"]}).json["text"] == body["text"]
    without_special = client.post("/detokenize", json={"ids": body["ids"], "skip_special_tokens": True}).json
    assert "<|im_start|>" not in without_special["text"]


@pytest.mark.parametrize(("path", "body", "field"), [
    pytest.param("/detokenize", {"ids": [-1]}, "ids", id="negative-id"),
    pytest.param("/detokenize", {"ids": ["1"]}, "ids", id="id-string"),
    pytest.param("/detokenize", {"ids": 5}, "ids", id="ids-not-a-list"),
    pytest.param("/detokenize", {}, "ids", id="ids-missing"),
    pytest.param("/detokenize", {"ids": [1], "extra": True}, "extra", id="unknown-field"),
    pytest.param("/tokenize", {}, "text", id="neither-text-nor-messages"),
    pytest.param("/tokenize", {"text": "a", "messages": [{"role": "user", "content": "b"}]}, "text", id="both"),
    pytest.param("/tokenize", {"text": None, "messages": None}, "text", id="both-null"),
    pytest.param("/tokenize", {"text": 3}, "text", id="text-not-a-string"),
    pytest.param("/tokenize", {"messages": [{"role": "robot", "content": "b"}]}, "messages", id="bad-role"),
    pytest.param("/tokenize", b"[1, 2]", "body", id="body-not-an-object"),
])
def test_bad_input_is_a_400_naming_the_field(client, path, body, field):
    response = client.post(path, json=body) if not isinstance(body, bytes) else \
        client.post(path, data=body, content_type="application/json")
    assert response.status_code == 400
    error = response.json["error"]
    assert error["type"] == "invalid_request" and error["field"] == field
    assert field in error["message"]


def test_an_id_outside_the_vocabulary_is_named_with_its_position(client, app_config):
    size = load_tokenizer(app_config["MODEL_DIR"]).vocab_size
    message = client.post("/detokenize", json={"ids": [1, 2, 99999]}).json["error"]["message"]
    assert "ids[2]" in message and "99999" in message and str(size) in message
    past = client.post("/detokenize", json={"ids": [1, size]})  # the first id past the vocabulary
    assert past.status_code == 400 and "ids[1]" in past.json["error"]["message"]
    assert client.post("/detokenize", json={"ids": [size - 1]}).status_code == 200  # its last id
