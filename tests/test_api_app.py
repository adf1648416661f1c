"""The app factory: cheap start (tokenizer loaded on first use), config layering, no torch in the API."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from api import create_app
from api.extensions import get_settings

ROOT = Path(__file__).resolve().parent.parent


def test_app_starts_without_the_model_and_says_what_is_missing(app_config, live_worker):
    live_worker("cpu")
    client = create_app({**app_config, "MODEL_DIR": "/nonexistent/model"}).test_client()
    assert client.get("/health").status_code == 200  # start-up did not touch the model folder
    response = client.post("/generate", json={"prompt": "Hello"})
    assert response.status_code == 500
    assert response.json["error"]["type"] == "configuration_error"
    assert "/nonexistent/model" in response.json["error"]["message"]


def test_settings_come_from_the_environment_then_flask_variables_then_test_config(monkeypatch, redis_client):
    monkeypatch.setenv("MAX_SEQ_LEN", "512")
    monkeypatch.setenv("KEEPALIVE_S", "2.5")
    monkeypatch.setenv("FLASK_KEEPALIVE_S", "3.5")
    app = create_app({"REDIS_CLIENT": redis_client, "BACKEND_MODE": "cpu"})
    with app.app_context():
        settings = get_settings()
    assert (settings.max_seq_len, settings.keepalive_s, settings.backend_mode) == (512, 3.5, "cpu")


def test_serving_a_request_never_imports_torch(app_config):
    script = (
        "import sys, fakeredis\n"
        "from api import create_app\n"
        "app = create_app({'REDIS_CLIENT': fakeredis.FakeRedis(), 'MODEL_DIR': sys.argv[1]})\n"
        "client = app.test_client()\n"
        "response = client.post('/generate', json={'prompt': 'Hello'})\n"
        "assert response.status_code == 503, response.json  # validated and tokenized; no worker\n"
        "chat = client.post('/v1/chat/completions', json={'messages': [{'role': 'user', 'content': 'Hi'}]})\n"
        "assert chat.status_code == 503, chat.json  # templated and tokenized; no worker\n"
        "assert client.post('/tokenize', json={'text': 'Hello'}).status_code == 200\n"
        "assert client.get('/openapi.json').status_code == 200 and client.get('/').status_code == 200\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", script, app_config["MODEL_DIR"]], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
