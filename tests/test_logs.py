"""Request ids (X-Request-Id honoured and returned), the access line, and the log formats (text, JSON)."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from api import create_app
from shared import logs
from shared.settings import Settings
from tests.fixtures_jobs import ScriptedWorker

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-never-to-be-logged-4242"


def test_a_sane_request_id_is_honoured_and_returned(client):
    response = client.get("/health", headers={"X-Request-Id": "trace-42.abc"})
    assert response.headers["X-Request-Id"] == "trace-42.abc"


@pytest.mark.parametrize("sent", [None, "", "has spaces", "x" * 200, "quote\"d", "<script>"])
def test_otherwise_a_new_one_is_made_and_returned(client, sent):
    headers = {"X-Request-Id": sent} if sent is not None else {}
    response = client.get("/health", headers=headers)
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["X-Request-Id"])


def test_errors_carry_the_request_id_too(client):
    for response in (client.get("/jobs/0123456789abcdef0123456789abcdef", headers={"X-Request-Id": "r-404"}),
                     client.post("/generate", data="{", headers={"X-Request-Id": "r-400"})):
        assert response.status_code in (400, 404)
        assert response.headers["X-Request-Id"] in ("r-404", "r-400")


def test_the_access_line_has_the_ids_and_the_key_name_never_the_key(app_config, redis_client, live_worker, caplog):
    client = create_app({**app_config, "API_KEYS": f"team-a:{KEY}"}).test_client()
    live_worker("cpu")
    worker = ScriptedWorker(redis_client, "cpu")
    worker.start()
    with caplog.at_level(logging.DEBUG):
        response = client.post("/generate", json={"prompt": "Hello", "max_tokens": 2},
                               headers={"Authorization": f"Bearer {KEY}", "X-Request-Id": "req-1"})
        response.close()
        client.get("/health", headers={"Authorization": f"Bearer {KEY}x"}).close()
        client.post("/tokenize", json={"text": "x"}, headers={"Authorization": f"Bearer {KEY}x"}).close()
    worker.finish()
    assert response.status_code == 200, response.json
    job_id = response.json["job_id"]
    access = [r for r in caplog.records if r.name == "api.access" and getattr(r, "request_id", None) == "req-1"]
    assert len(access) == 1
    line = access[0]
    assert (line.method, line.path, line.status, line.key, line.job_id) == ("POST", "/generate", 200, "team-a", job_id)
    assert line.duration_s >= 0
    enqueued = [r for r in caplog.records if r.name == "api.jobs.tracking"]
    assert enqueued and "enqueued" in enqueued[-1].getMessage()
    everything = caplog.text + " ".join(str(vars(record)) for record in caplog.records)
    assert KEY not in everything


def test_json_lines_carry_the_bound_ids_and_extra_fields():
    formatter = logs.JsonFormatter()
    record = logging.LogRecord("api.x", logging.WARNING, __file__, 1, "job %s ended", ("j1",), None)
    with logs.bound(request_id="r1", job_id="j1"):
        line = json.loads(formatter.format(record))
    assert line["level"] == "WARNING" and line["logger"] == "api.x" and line["message"] == "job j1 ended"
    assert line["request_id"] == "r1" and line["job_id"] == "j1" and line["time"].endswith("+00:00")
    outside = json.loads(formatter.format(record))
    assert "request_id" not in outside


def test_an_exception_stays_on_one_json_line():
    formatter = logs.JsonFormatter()
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("w", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    text = formatter.format(record)
    assert "\n" not in text and "ValueError: boom" in json.loads(text)["exc_info"]


def test_text_lines_append_the_ids_after_the_message():
    record = logging.LogRecord("api.x", logging.INFO, __file__, 1, "hello", (), None)
    with logs.bound(request_id="r1"):
        assert logs.TextFormatter().format(record).endswith(f"api.x [{record.process}]: hello [request_id=r1]")


def test_ids_bound_for_a_block_are_restored_after_it():
    with logs.bound(job_id="outer"):
        with logs.bound(job_id="inner"):
            assert logs.current_ids() == {"job_id": "inner"}
        assert logs.current_ids() == {"job_id": "outer"}
    assert logs.current_ids() == {}


def test_bad_log_settings_stop_the_start():
    with pytest.raises(Exception, match="LOG_FORMAT"):
        Settings.from_env({"LOG_FORMAT": "xml"})
    with pytest.raises(Exception, match="LOG_LEVEL"):
        Settings.from_env({"LOG_LEVEL": "loud"})


def test_a_worker_process_logs_rq_s_lines_in_the_same_json(tmp_path):
    """What `rq worker` does before it starts working, then our configure() (in a process of its own: it changes
    the process's logging)."""
    script = (
        "import logging\n"
        "from rq.logutils import setup_loghandlers\n"
        "from shared import logs\n"
        "from shared.settings import Settings\n"
        "setup_loghandlers('INFO')\n"
        "logs.configure(Settings.from_env({'LOG_FORMAT': 'json'}))\n"
        "setup_loghandlers('INFO', name='rq.worker')\n"
        "with logs.bound(job_id='j9'):\n"
        "    logging.getLogger('rq.worker').info('Job OK')\n"
        "logging.getLogger('workers.x').warning('plain')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in (result.stdout + result.stderr).splitlines()]
    assert [(line["logger"], line["message"]) for line in lines] == [("rq.worker", "Job OK"), ("workers.x", "plain")]
    assert lines[0]["job_id"] == "j9" and "job_id" not in lines[1]


def test_the_gunicorn_config_formats_gunicorn_s_own_lines(tmp_path):
    config = logs.dict_config(Settings.from_env({"LOG_FORMAT": "json", "LOG_LEVEL": "warning"}))
    assert config["formatters"]["main"]["()"] == "shared.logs.JsonFormatter"
    assert config["root"]["level"] == "WARNING"
    assert config["loggers"]["gunicorn.access"]["level"] == "WARNING"  # the API writes its own access lines
