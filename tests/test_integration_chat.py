"""Conversations, beam search with the reranker, scoring and batches end to end: gunicorn + a real CPU
worker (SmolLM2, the reranker's embedding model) + real Redis, over HTTP."""

from __future__ import annotations

import time

import pytest
import requests

from tests.sse_client import iter_events

pytestmark = [pytest.mark.integration, pytest.mark.model]

QUESTION = "What is the capital of France?"
POLL_DEADLINE_S = 300
"""Longest wait for a background batch on a busy 2-core machine."""


def stream(service, path: str, body: dict) -> list:
    """POST `body` and read the whole SSE stream."""
    with requests.post(service.url(path), json=body, stream=True, timeout=300) as response:
        assert response.status_code == 200, response.text
        assert response.headers["X-Messages-Dropped"] == "0"
        return list(iter_events(response))


def test_chat_answers_the_capital_of_france(service):
    events = stream(service, "/chat", {"messages": [QUESTION], "max_tokens": 24, "temperature": 0})
    tokens, done = events[:-1], events[-1]
    assert done.event == "done" and {e.event for e in tokens} == {"token"}
    assert "".join(e.data["text"] for e in tokens) == done.data["output_text"]
    assert "Paris" in done.data["output_text"]


def test_chat_with_history_in_objects_streams_a_reply(service):
    messages = [{"role": "system", "content": "You answer in one short sentence."},
                {"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi! How can I help?"},
                {"role": "user", "content": QUESTION}]
    done = stream(service, "/chat", {"messages": messages, "max_tokens": 24, "temperature": 0})[-1]
    assert done.event == "done" and done.data["output_text"].strip()


def beam(service, use_rerank: bool) -> tuple[dict, list, dict]:
    """(candidates event, token events, done event) of a width-4 beam search for QUESTION."""
    return beam_of(service, {"messages": [QUESTION], "beam_width": 4, "max_tokens": 16, "use_rerank": use_rerank})


def beam_of(service, body: dict) -> tuple[dict, list, dict]:
    """(candidates event, token events, done event) of a beam search."""
    events = stream(service, "/stream_chat_beam", body)
    assert [e.event for e in events] == ["candidates"] + ["token"] * (len(events) - 2) + ["done"]
    return events[0].data, events[1:-1], events[-1].data


def test_beam_without_rerank_streams_the_best_beam(service):
    listed, tokens, done = beam(service, use_rerank=False)
    candidates = listed["candidates"]
    assert len(candidates) == 4 and listed["use_rerank"] is False
    assert all(c["rerank_score"] is None for c in candidates)
    assert done["winner"] == listed["winner"] == 0
    assert [c["beam_score"] for c in candidates] == sorted((c["beam_score"] for c in candidates), reverse=True)
    assert "".join(e.data["text"] for e in tokens) == done["output_text"] == candidates[0]["text"]


@pytest.mark.parametrize("question", ["Write a haiku about the sea.", "Explain recursion to a child."])
def test_a_beam_of_width_one_without_rerank_streams_the_greedy_chat_answer(service, question):
    # The beam's row is decoded by the same compiled INT8 step as /chat's sequence; on a cache of its own,
    # decoded eagerly, it parted from it at the 9th and the 23rd token of these.
    chat = stream(service, "/chat", {"messages": [question], "max_tokens": 48, "temperature": 0})
    listed, tokens, done = beam_of(service, {"messages": [question], "beam_width": 1, "max_tokens": 48,
                                             "use_rerank": False})
    greedy = chat[-1].data
    assert chat[-1].event == "done" and len(greedy["output_ids"]) > 30
    assert done["output_ids"] == greedy["output_ids"] and done["finish_reason"] == greedy["finish_reason"]
    assert "".join(e.data["text"] for e in tokens) == done["output_text"] == greedy["output_text"]
    assert [c["text"] for c in listed["candidates"]] == [greedy["output_text"]]


def test_beam_with_rerank_streams_the_best_combined_score(service):
    listed, tokens, done = beam(service, use_rerank=True)
    candidates = listed["candidates"]
    assert len(candidates) == 4 and all(isinstance(c["rerank_score"], float) for c in candidates)
    best = max(candidates, key=lambda c: c["combined_score"])
    assert done["winner"] == listed["winner"] == best["index"]
    assert "".join(e.data["text"] for e in tokens) == done["output_text"] == best["text"]


def test_rerank_scores_scores_the_given_candidates(service):
    candidates = ["The capital of France is Paris.", "I like to eat apples in the garden."]
    response = requests.post(service.url("/rerank_scores"), json={"messages": [QUESTION], "candidates": candidates},
                             timeout=300)
    assert response.status_code == 200, response.text
    body = response.json()
    assert [row["text"] for row in body["candidates"]] == candidates
    assert [row["index"] for row in body["candidates"]] == [0, 1]
    for row in body["candidates"]:
        assert row["lm_score"] < 0 and -1 <= row["rerank_score"] <= 1
    assert body["winner"] == max(body["candidates"], key=lambda row: row["combined_score"])["index"] == 0


PROMPTS = ["The capital of France is", "Once upon a time, a fox", "Water boils at"]


def test_batch_wait_answers_each_prompt_as_generate_would(service):
    response = requests.post(service.url("/generate_batch"), json={"prompts": PROMPTS, "max_tokens": 12,
                                                                   "temperature": 0}, timeout=300)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "done" and body["progress"] == {"done": 3, "total": 3}
    for prompt, result in zip(PROMPTS, body["results"], strict=True):
        alone = requests.post(service.url("/generate"), json={"prompt": prompt, "max_tokens": 12, "temperature": 0},
                              timeout=300).json()
        assert result["input"] == prompt
        assert (result["output_ids"], result["output_text"]) == (alone["output_ids"], alone["output_text"])


def test_batch_in_the_background_is_polled_until_done(service):
    response = requests.post(service.url("/generate_batch"), json={"prompts": PROMPTS, "max_tokens": 12,
                                                                   "temperature": 0, "wait": False}, timeout=60)
    assert response.status_code == 202, response.text
    location = response.headers["Location"]
    assert location == f"/batches/{response.json()['batch_id']}"
    seen, deadline = [], time.monotonic() + POLL_DEADLINE_S
    while time.monotonic() < deadline:
        status = requests.get(service.url(location), timeout=30).json()
        seen.append(status["progress"]["done"])
        assert status["progress"]["total"] == 3
        assert sum(result is not None for result in status["results"]) == seen[-1]
        if status["status"] == "done":
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"the batch did not finish within {POLL_DEADLINE_S} s: {seen[-5:]}")
    assert seen == sorted(seen) and seen[-1] == 3  # progress never went back
    assert [result["input"] for result in status["results"]] == PROMPTS
    assert all(result["output_ids"] for result in status["results"])
