"""API keys, job ownership, the per-key limit and CORS, on the app with fakeredis and scripted workers."""

from __future__ import annotations

import threading
import time

import pytest

from api import create_app
from api.auth import KeyRing, digest, is_open
from api.limits import KeyLimiter, lease_set
from shared.exceptions import ConfigurationError, OverloadedError
from shared.settings import Settings
from tests.fixtures_jobs import ScriptedWorker
from tests.sse_client import parse_sse

ALICE, BOB = "sk-alice-0123456789", "sk-bob-9876543210"


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def keyed_app(app_config):
    return create_app({**app_config, "API_KEYS": f"alice:{ALICE}, {BOB}"})


@pytest.fixture
def keyed(keyed_app):
    return keyed_app.test_client()


# --- keys ------------------------------------------------------------------------------------------------

def test_without_keys_every_route_is_open(client):
    assert client.post("/tokenize", json={"text": "Hello"}).status_code == 200


def test_a_missing_key_is_a_401_in_the_json_error_shape(keyed):
    response = keyed.post("/tokenize", json={"text": "Hello"})
    assert response.status_code == 401
    assert response.json["error"]["type"] == "missing_api_key"
    assert "Authorization: Bearer" in response.json["error"]["message"]
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("header", [f"Bearer {ALICE}x", f"Basic {ALICE}", "Bearer", ALICE])
def test_a_wrong_key_or_scheme_is_a_401_that_never_repeats_the_key(keyed, header):
    response = keyed.post("/tokenize", json={"text": "Hello"}, headers={"Authorization": header})
    assert response.status_code == 401
    assert response.json["error"]["type"] == "invalid_api_key"
    assert ALICE not in response.get_data(as_text=True)


def test_a_valid_key_is_served(keyed):
    for key in (ALICE, BOB):
        assert keyed.post("/tokenize", json={"text": "Hello"}, headers=bearer(key)).status_code == 200


def test_v1_answers_401_in_openai_s_shape(keyed):
    response = keyed.get("/v1/models")
    assert response.status_code == 401
    assert response.json == {"error": {"message": response.json["error"]["message"], "type": "invalid_request_error",
                                       "param": None, "code": "missing_api_key"}}
    wrong = keyed.get("/v1/models", headers=bearer("nope"))
    assert wrong.status_code == 401 and wrong.json["error"]["code"] == "invalid_api_key"
    assert keyed.get("/v1/models", headers=bearer(ALICE)).status_code == 200


@pytest.mark.parametrize("path", ["/health", "/metrics", "/docs", "/docs/assets/css/swagger-ui.css", "/openapi.json",
                                  "/", "/static/demo.js"])
def test_the_default_open_routes_need_no_key(keyed, path):
    assert keyed.get(path).status_code == 200


def test_open_routes_are_a_setting(app_config):
    closed = create_app({**app_config, "API_KEYS": ALICE, "OPEN_ROUTES": "/health"}).test_client()
    assert closed.get("/health").status_code == 200
    assert closed.get("/metrics").status_code == 401
    assert closed.get("/metrics", headers=bearer(ALICE)).status_code == 200
    nothing_open = create_app({**app_config, "API_KEYS": ALICE, "OPEN_ROUTES": ""}).test_client()
    assert nothing_open.get("/health").status_code == 401


def test_an_unknown_path_wants_a_key_too(keyed):
    assert keyed.get("/nothing-here").status_code == 401
    assert keyed.get("/nothing-here", headers=bearer(ALICE)).status_code == 404


def test_a_cors_preflight_needs_no_key(app_config):
    app = create_app({**app_config, "API_KEYS": ALICE, "CORS_ORIGINS": "https://app.example"})
    response = app.test_client().options("/stream", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert response.status_code == 200
    assert "Authorization" in response.headers["Access-Control-Allow-Headers"]


def test_is_open_matches_whole_path_segments():
    routes = ["/", "/docs", "/static/"]
    assert is_open("/", routes) and is_open("/docs", routes) and is_open("/docs/assets/x.js", routes)
    assert is_open("/static/demo.js", routes)
    assert not is_open("/docsx", routes) and not is_open("/generate", routes)


def test_keys_come_from_the_setting_and_the_file(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text("# team keys\n\ncarol:sk-carol-1\n  sk-dave-2  \n")
    ring = KeyRing.from_settings(Settings.from_env({}, api_keys="alice:sk-a,sk-b", api_keys_file=str(keys_file)))
    names = {key.name for key in ring.keys.values()}
    assert names == {"alice", "carol", f"key-{digest('sk-b')[:8]}", f"key-{digest('sk-dave-2')[:8]}"}
    assert ring.find("sk-carol-1").name == "carol" and ring.find("sk-carol") is None
    assert ring.find("sk-a").owner == digest("sk-a")


@pytest.mark.parametrize(("api_keys", "message"), [
    ("sk-a,sk-a", "repeats a key"), (":sk-a", "empty name"), ("alice:", "no key"), ("alice:sk a", "spaces"),
])
def test_bad_key_entries_stop_the_start_without_showing_the_key(app_config, api_keys, message):
    with pytest.raises(ConfigurationError) as raised:
        create_app({**app_config, "API_KEYS": api_keys})
    assert message in str(raised.value) and "sk-a" not in str(raised.value)


def test_an_unreadable_keys_file_stops_the_start(app_config, tmp_path):
    with pytest.raises(ConfigurationError, match="API_KEYS_FILE"):
        create_app({**app_config, "API_KEYS_FILE": str(tmp_path / "missing")})


def test_settings_never_show_the_keys():
    assert ALICE not in repr(Settings.from_env({}, api_keys=ALICE))


# --- ownership -------------------------------------------------------------------------------------------

def run_stream(keyed, redis_client, key: str) -> str:
    """A /stream job made with `key`, run to its end by a scripted worker; its id."""
    worker = ScriptedWorker(redis_client, "cpu")
    worker.start()
    response = keyed.post("/stream", json={"prompt": "Hello", "max_tokens": 2}, headers=bearer(key))
    assert response.status_code == 200, response.get_data(as_text=True)
    parse_sse(response.get_data(as_text=True))
    worker.finish()
    return response.headers["X-Job-Id"]


def test_a_job_belongs_to_the_key_that_made_it(keyed, redis_client, live_worker):
    live_worker("cpu")
    job_id = run_stream(keyed, redis_client, ALICE)
    assert keyed.get(f"/jobs/{job_id}", headers=bearer(ALICE)).json["status"] == "finished"
    events, _ = parse_sse(keyed.get(f"/jobs/{job_id}/stream", headers=bearer(ALICE)).get_data(as_text=True))
    assert events[-1]["event"] == "done"
    unknown = keyed.get("/jobs/0123456789abcdef0123456789abcdef", headers=bearer(BOB))
    for method, path in (("GET", f"/jobs/{job_id}"), ("GET", f"/jobs/{job_id}/stream"), ("DELETE", f"/jobs/{job_id}")):
        response = keyed.open(path, method=method, headers=bearer(BOB))
        assert response.status_code == 404, (method, path)
        assert response.json["error"] == {**unknown.json["error"], "message": f"no job with id {job_id!r}"}
    assert keyed.get(f"/jobs/{job_id}").status_code == 401


def test_a_batch_belongs_to_the_key_that_made_it(keyed, redis_client, live_worker):
    live_worker("cpu")
    worker = ScriptedWorker(redis_client, "cpu", jobs=2)
    worker.start()
    response = keyed.post("/generate_batch", json={"prompts": ["a", "b"], "max_tokens": 2}, headers=bearer(ALICE))
    worker.finish()
    assert response.status_code == 200, response.json
    batch_id = response.json["batch_id"]
    assert keyed.get(f"/batches/{batch_id}", headers=bearer(ALICE)).json["status"] == "done"
    other = keyed.get(f"/batches/{batch_id}", headers=bearer(BOB))
    assert other.status_code == 404 and other.json["error"]["field"] == "batch_id"
    for result in response.json["results"]:  # each prompt's job is the key's too
        assert keyed.get(f"/jobs/{result['job_id']}", headers=bearer(BOB)).status_code == 404
        assert keyed.get(f"/jobs/{result['job_id']}", headers=bearer(ALICE)).status_code == 200


def test_without_keys_nothing_is_recorded_and_any_client_reads_a_job(client, redis_client, live_worker):
    live_worker("cpu")
    job_id = run_stream(client, redis_client, "ignored")
    assert not redis_client.keys("llm:owner:*")
    assert client.get(f"/jobs/{job_id}").status_code == 200


# --- the per-key limit -----------------------------------------------------------------------------------

def test_a_key_over_its_limit_gets_429_with_retry_after(app_config, live_worker, redis_client):
    app = create_app({**app_config, "API_KEYS": f"{ALICE},{BOB}", "MAX_CONCURRENT_PER_KEY": 1})
    client = app.test_client()
    live_worker("cpu")
    held = client.post("/stream", json={"prompt": "Hello"}, headers=bearer(ALICE), buffered=False)
    assert held.status_code == 200  # its lease is held until the stream is closed
    refused = client.post("/stream", json={"prompt": "Hello"}, headers=bearer(ALICE))
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
    assert refused.json["error"]["type"] == "overloaded"
    assert "MAX_CONCURRENT_PER_KEY" in refused.json["error"]["message"]
    v1 = client.post("/v1/completions", json={"prompt": "Hello"}, headers=bearer(ALICE))
    assert v1.status_code == 429 and v1.json["error"]["code"] == "overloaded"
    assert client.post("/tokenize", json={"text": "Hi"}, headers=bearer(BOB)).status_code == 200  # another key
    job_id = held.headers["X-Job-Id"]
    assert client.delete(f"/jobs/{job_id}", headers=bearer(ALICE)).status_code == 200  # stopping is never refused
    held.close()
    assert client.post("/tokenize", json={"text": "Hi"}, headers=bearer(ALICE)).status_code == 200


def test_leases_are_shared_through_redis_and_lapse(redis_client, monkeypatch):
    ring = KeyRing.from_settings(Settings.from_env({}, api_keys=ALICE))
    key = ring.find(ALICE)
    first, second = KeyLimiter(2), KeyLimiter(2)  # two API processes
    leases = [first.acquire(redis_client, key), second.acquire(redis_client, key)]
    with pytest.raises(OverloadedError):
        first.acquire(redis_client, key)
    leases[0].release()
    leases[0].release()  # given back once
    leases.append(second.acquire(redis_client, key))
    assert redis_client.zcard(lease_set(key)) == 2
    # A process that died stops renewing: its leases lapse after LEASE_S.
    later = time.time() + 10_000
    monkeypatch.setattr("api.limits.time.time", lambda: later)
    assert first.acquire(redis_client, key) is not None


def test_a_lease_renewal_pushes_the_deadline(redis_client):
    key = KeyRing.from_settings(Settings.from_env({}, api_keys=ALICE)).find(ALICE)
    limiter = KeyLimiter(1)
    lease = limiter.acquire(redis_client, key)
    before = redis_client.zscore(lease_set(key), lease.lease_id)
    time.sleep(0.01)
    limiter.renew()
    assert redis_client.zscore(lease_set(key), lease.lease_id) > before
    lease.release()
    limiter.renew()  # renews nothing, adds nothing back
    assert redis_client.zcard(lease_set(key)) == 0


def test_concurrent_acquires_never_exceed_the_limit(redis_client):
    key = KeyRing.from_settings(Settings.from_env({}, api_keys=ALICE)).find(ALICE)
    limiter, taken, start = KeyLimiter(3), [], threading.Barrier(12)

    def take():
        start.wait()
        try:
            taken.append(limiter.acquire(redis_client, key))
        except OverloadedError:
            pass

    threads = [threading.Thread(target=take) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(taken) == 3


# --- CORS ------------------------------------------------------------------------------------------------

def test_no_cors_headers_by_default(client):
    response = client.get("/health", headers={"Origin": "https://app.example"})
    assert "Access-Control-Allow-Origin" not in response.headers


def test_allowed_origins_get_cors_headers_and_others_do_not(app_config):
    client = create_app({**app_config, "CORS_ORIGINS": "https://app.example, https://b.example/"}).test_client()
    allowed = client.get("/health", headers={"Origin": "https://b.example"})
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://b.example"
    assert "X-Job-Id" in allowed.headers["Access-Control-Expose-Headers"]
    assert "Origin" in allowed.headers["Vary"]
    other = client.get("/health", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers
    preflight = client.options("/generate", headers={"Origin": "https://app.example",
                                                     "Access-Control-Request-Method": "POST"})
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert "Access-Control-Allow-Credentials" not in preflight.headers


def test_a_401_carries_cors_headers_so_a_page_can_read_it(app_config):
    client = create_app({**app_config, "API_KEYS": ALICE, "CORS_ORIGINS": "*"}).test_client()
    response = client.post("/generate", json={"prompt": "x"}, headers={"Origin": "https://any.example"})
    assert response.status_code == 401 and response.headers["Access-Control-Allow-Origin"] == "*"
