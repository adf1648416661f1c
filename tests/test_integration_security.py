"""API keys, job ownership, the per-key limit and CORS through real gunicorn processes, a real CPU worker and
a real Redis; the official `openai` client with `api_key`; the demo page with a key; no key in any log."""

from __future__ import annotations

import time
from pathlib import Path

import openai
import pytest
import requests

from tests.secured_fleet import ALICE, BOB, CAROL, KEYS, ORIGIN, PER_KEY_LIMIT, bearer
from tests.sse_client import iter_events

pytestmark = [pytest.mark.integration, pytest.mark.model]

CHROMIUM = Path("/usr/bin/chromium")
COUNTING = "1, 2, 3, 4, 5,"
"""Greedy, SmolLM2 counts on for as long as it is asked to: a long stream to hold open."""


def stream(secured, key: str, max_tokens: int = 4, **extra) -> requests.Response:
    response = requests.post(secured.url("/stream"), json={"prompt": COUNTING, "max_tokens": max_tokens,
                                                           "temperature": 0}, headers={**bearer(key), **extra},
                             stream=True, timeout=120)
    assert response.status_code == 200, response.text
    return response


def test_without_a_key_every_closed_route_answers_401(secured):
    for method, path in (("POST", "/generate"), ("POST", "/stream"), ("GET", "/jobs/0123456789abcdef0123456789abcdef"),
                         ("POST", "/tokenize")):
        response = requests.request(method, secured.url(path), json={"prompt": "x"}, timeout=10)
        assert response.status_code == 401, path
        assert response.json()["error"]["type"] == "missing_api_key"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    wrong = requests.post(secured.url("/tokenize"), json={"text": "x"}, headers=bearer(ALICE + "x"), timeout=10)
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "invalid_api_key"
    for path in ("/health", "/metrics", "/docs", "/openapi.json", "/"):
        assert requests.get(secured.url(path), timeout=10).status_code == 200, path


def test_keys_from_the_setting_and_from_the_file_both_work(secured):
    for key in KEYS:
        response = requests.post(secured.url("/tokenize"), json={"text": "Hello"}, headers=bearer(key), timeout=10)
        assert response.status_code == 200


def test_the_official_client_s_api_key_works(secured):
    client = openai.OpenAI(base_url=secured.url("/v1"), api_key=BOB, max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert chat.choices[0].message.content is not None
    stranger = openai.OpenAI(base_url=secured.url("/v1"), api_key="sk-not-ours", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError) as raised:
        stranger.models.list()
    assert raised.value.status_code == 401 and raised.value.body["code"] == "invalid_api_key"


def test_another_key_cannot_see_read_or_cancel_a_job(secured):
    with stream(secured, ALICE) as response:
        job_id = response.headers["X-Job-Id"]
        events = list(iter_events(response))
    assert events[-1].event == "done"
    for method, path in (("GET", f"/jobs/{job_id}"), ("GET", f"/jobs/{job_id}/stream"), ("DELETE", f"/jobs/{job_id}")):
        other = requests.request(method, secured.url(path), headers=bearer(BOB), timeout=30)
        assert other.status_code == 404, (method, path)
        assert other.json()["error"] == {"type": "not_found", "message": f"no job with id {job_id!r}",
                                         "field": "job_id"}
    mine = requests.get(secured.url(f"/jobs/{job_id}"), headers=bearer(ALICE), timeout=10)
    assert mine.json()["status"] == "finished"
    with requests.get(secured.url(f"/jobs/{job_id}/stream"), headers=bearer(ALICE), stream=True, timeout=30) as again:
        assert [e.data for e in iter_events(again)] == [e.data for e in events]
    assert requests.delete(secured.url(f"/jobs/{job_id}"), headers=bearer(ALICE), timeout=10).status_code == 200


def test_another_key_cannot_cancel_a_running_job(secured):
    with stream(secured, ALICE, max_tokens=60) as response:
        job_id = response.headers["X-Job-Id"]
        events = iter_events(response)
        next(events)
        assert requests.delete(secured.url(f"/jobs/{job_id}"), headers=bearer(BOB), timeout=10).status_code == 404
        rest = list(events)
    assert rest[-1].event == "done", "the job went on to its end"


def test_another_key_cannot_read_a_batch(secured):
    body = {"prompts": ["The sea is", "The sky is"], "max_tokens": 3, "temperature": 0, "wait": False}
    accepted = requests.post(secured.url("/generate_batch"), json=body, headers=bearer(ALICE), timeout=30)
    assert accepted.status_code == 202
    location = secured.url(accepted.headers["Location"])
    assert requests.get(location, headers=bearer(BOB), timeout=10).status_code == 404
    deadline = time.monotonic() + 120
    while (batch := requests.get(location, headers=bearer(ALICE), timeout=10).json())["status"] != "done":
        assert time.monotonic() < deadline, batch
        time.sleep(0.2)
    for result in batch["results"]:
        job = secured.url(f"/jobs/{result['job_id']}")
        assert requests.get(job, headers=bearer(BOB), timeout=10).status_code == 404


def test_a_key_over_its_concurrent_limit_gets_429_like_the_admission_bound(secured):
    held = [stream(secured, CAROL, max_tokens=400) for _ in range(PER_KEY_LIMIT)]
    # Keep the readers: a reader dropped mid-stream closes its connection (urllib3), which ends the stream.
    readers = [iter_events(response) for response in held]
    try:
        for reader in readers:
            assert next(reader).event == "token"  # both are running
        refused = requests.post(secured.url("/generate"), json={"prompt": "Hi", "max_tokens": 2},
                                headers=bearer(CAROL), timeout=30)
        assert refused.status_code == 429
        assert refused.headers["Retry-After"] == "1"
        assert refused.json()["error"]["type"] == "overloaded"
        client = openai.OpenAI(base_url=secured.url("/v1"), api_key=CAROL, max_retries=0, timeout=30)
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model="", prompt="Hi", max_tokens=2)
        # Other keys are not held back, and stopping work is never refused.
        other = requests.post(secured.url("/tokenize"), json={"text": "Hi"}, headers=bearer(ALICE), timeout=10)
        assert other.status_code == 200
        job_id = held[0].headers["X-Job-Id"]
        assert requests.delete(secured.url(f"/jobs/{job_id}"), headers=bearer(CAROL), timeout=10).status_code in (200,
                                                                                                                  202)
    finally:
        for response in held:
            response.close()
    # The streams' leases are given back as their responses close (the client left: the jobs are cancelled).
    deadline = time.monotonic() + 30
    while True:
        again = requests.post(secured.url("/tokenize"), json={"text": "Hi"}, headers=bearer(CAROL), timeout=10)
        if again.status_code == 200:
            break
        assert again.status_code == 429 and time.monotonic() < deadline
        time.sleep(0.2)


def test_cors_allows_the_configured_origin_only(secured):
    preflight = requests.options(secured.url("/v1/chat/completions"), timeout=10, headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert preflight.status_code == 200
    assert preflight.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]
    answer = requests.post(secured.url("/tokenize"), json={"text": "x"}, timeout=10,
                           headers={**bearer(ALICE), "Origin": ORIGIN})
    assert answer.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "X-Request-Id" in answer.headers["Access-Control-Expose-Headers"]
    stranger = requests.post(secured.url("/tokenize"), json={"text": "x"}, timeout=10,
                             headers={**bearer(ALICE), "Origin": "https://elsewhere.example"})
    assert "Access-Control-Allow-Origin" not in stranger.headers


@pytest.fixture
def page(secured):
    if not CHROMIUM.exists():
        pytest.skip(f"Debian's chromium is not installed at {CHROMIUM}")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM),
                                             args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        page.set_default_timeout(120_000)
        page.goto(secured.url("/"))
        yield page
        browser.close()


def test_the_demo_page_takes_a_key(page):
    page.fill("#prompt", COUNTING)
    page.fill("#max-tokens", "6")
    page.click("#send")
    page.wait_for_function("document.querySelector('#output').dataset.state === 'error'")
    assert "401" in page.text_content("#message") and "API key" in page.text_content("#message")
    page.fill("#api-key", ALICE)
    page.dispatch_event("#api-key", "change")
    page.click("#send")
    page.wait_for_function("document.querySelector('#output').dataset.state === 'done'")
    assert page.text_content("#output").strip() and len(page.text_content("#job-id")) == 32
    assert page.evaluate("sessionStorage.getItem('llm-api-key')") == ALICE  # kept for the tab's session only


def test_no_key_is_ever_written_to_a_log(secured):
    """Last in the module: every request above sent keys, good and bad."""
    requests.get(secured.url("/health"), headers=bearer(ALICE), timeout=10)  # an open route, with a key
    requests.post(secured.url("/generate"), json={"prompt": "x"}, headers=bearer(BOB + "-wrong"), timeout=10)
    time.sleep(0.5)  # the access lines of the last requests
    for name in ("web", "cpu"):
        text = secured.log_text(name)
        assert text, name
        for key in (*KEYS, BOB + "-wrong"):
            assert key not in text, f"a key is in the {name} log"
