"""The demo page in a real headless browser (Debian's chromium, driven by Playwright) against the real
service: typed prompts stream into the page token by token, chat keeps its history, stop cancels the job."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests

from tests.sse_client import iter_events

pytestmark = [pytest.mark.integration, pytest.mark.model]

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
WAIT_MS = 180_000
"""Longest wait for the page to change (a busy 2-core machine runs the model slowly)."""

SNAPSHOT = "() => { const o = document.querySelector('#output'); return [o.dataset.state, o.textContent]; }"
CHANGED = ("([state, length]) => { const o = document.querySelector('#output');"
           " return o.dataset.state !== state || o.textContent.length !== length; }")


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"Debian's chromium is not installed at {CHROMIUM} (bin/setup installs it when run as root)")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, service):
    page = browser.new_page(viewport={"width": 1200, "height": 800})
    page.set_default_timeout(WAIT_MS)
    page.goto(service.url("/"))
    yield page
    page.close()


def watch_stream(page) -> tuple[list[int], str, str]:
    """Follow #output until it stops streaming: (the lengths seen while streaming, final state, final text)."""
    lengths: list[int] = []
    page.wait_for_function("document.querySelector('#output').dataset.state !== 'idle'")
    while True:
        state, text = page.evaluate(SNAPSHOT)
        if state != "streaming":
            return lengths, state, text
        if text and (not lengths or lengths[-1] != len(text)):
            lengths.append(len(text))
        page.wait_for_function(CHANGED, arg=[state, len(text)], polling="raf")


def test_a_prompt_streams_into_the_page(page):
    page.fill("#prompt", "Once upon a time, there was a little fox who")
    page.fill("#max-tokens", "40")
    page.fill("#temperature", "0")
    page.click("#send")
    lengths, state, text = watch_stream(page)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "demo.png"), full_page=True)
    assert state == "done", page.text_content("#message")
    assert len(set(lengths)) >= 2, f"the text did not grow while streaming: {lengths}"
    assert text.strip() and len(text) >= lengths[-1]
    assert page.text_content("#finish") in ("length", "eos", "stop")
    assert page.text_content("#ttft").endswith(" ms") and float(page.text_content("#tps")) > 0
    assert len(page.text_content("#job-id")) == 32


def test_chat_mode_streams_a_reply_and_keeps_the_history(page):
    page.check('input[name="mode"][value="chat"]')
    page.fill("#prompt", "Name a colour.")
    page.fill("#max-tokens", "16")
    page.click("#send")
    _, state, reply = watch_stream(page)
    assert state == "done", page.text_content("#message")
    turns = page.locator("#history .turn")
    assert turns.count() == 2
    assert "Name a colour." in turns.nth(0).text_content() and reply in turns.nth(1).text_content()
    assert page.input_value("#prompt") == ""


def test_stop_aborts_the_stream_and_cancels_the_job(page, service):
    # A story opening, greedy: an instruction in prompt mode often ends at once (the model's first token is
    # EOS with probability 0.5 at the page's default temperature, 1 when greedy), leaving nothing to stop.
    page.fill("#prompt", "Once upon a time, a lighthouse keeper named Tom")
    page.fill("#max-tokens", "600")
    page.fill("#temperature", "0")
    page.click("#send")
    page.wait_for_function("document.querySelector('#output').textContent.length > 0")
    page.click("#stop")
    assert page.get_attribute("#output", "data-state") == "stopped"
    job_id = page.text_content("#job-id")
    with requests.get(service.url(f"/jobs/{job_id}/stream"), stream=True, timeout=120) as response:
        last = list(iter_events(response))[-1]
    assert last.event == "error" and last.data["error"]["type"] == "cancelled"


def test_beam_mode_says_so_when_the_server_has_no_beam_route(page):
    page.route("**/stream_chat_beam", lambda route: route.fulfill(
        status=404, content_type="application/json", body='{"error": {"type": "not_found", "message": "nope"}}'))
    page.fill("#prompt", "Hello")
    page.fill("#beam-width", "3")
    page.click("#send")
    page.wait_for_function("document.querySelector('#output').dataset.state === 'error'")
    assert "Beam search is not available" in page.text_content("#message")


def test_beam_mode_shows_the_candidates_and_their_scores(page):
    candidates = [{"text": "Blue.", "beam_score": -1.25, "rerank_score": 0.9, "combined_score": 0.4},
                  {"text": "Green.", "beam_score": -2.5, "rerank_score": 0.1, "combined_score": -0.7}]
    frames = [("candidates", {"candidates": candidates}), ("token", {"token": 1, "text": "Blue.", "index": 0}),
              ("done", {"job_id": "j", "output_text": "Blue.", "output_ids": [1], "finish_reason": "eos",
                        "usage": {"prompt_tokens": 3, "completion_tokens": 1}})]
    body = "".join(f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in frames)
    page.route("**/stream_chat_beam", lambda route: route.fulfill(
        status=200, content_type="text/event-stream", headers={"X-Job-Id": "j"}, body=body))
    page.fill("#prompt", "A colour?")
    page.fill("#beam-width", "2")
    page.click("#send")
    page.wait_for_function("document.querySelector('#output').dataset.state === 'done'")
    items = page.locator("#candidates li")
    assert items.count() == 2
    assert "Blue." in items.nth(0).text_content() and "combined 0.400" in items.nth(0).text_content()
    assert page.text_content("#output") == "Blue."


def test_beam_mode_runs_a_real_beam_search(page):
    page.fill("#prompt", "What is the capital of France?")
    page.fill("#max-tokens", "8")
    page.fill("#beam-width", "2")
    page.click("#send")
    _, state, text = watch_stream(page)
    assert state == "done", page.text_content("#message")
    items = page.locator("#candidates li")
    assert items.count() == 2 and text in [items.nth(i).locator("div").first.text_content() for i in range(2)]
