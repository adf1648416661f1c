"""Gunicorn settings for the API: `gunicorn -c deploy/gunicorn.conf.py 'api:create_app()'`.

Every open event stream (and every blocking /generate) holds one thread for its whole life, so the
workers are threaded: WEB_CONCURRENCY processes x GUNICORN_THREADS threads is the number of requests
served at once. A config file is read once when gunicorn starts, so reading the environment here is fine.
"""

import os

bind = f"0.0.0.0:{os.environ.get('PORT', '8080')}"
"""Listen on every interface, on PORT (default 8080)."""

worker_class = "gthread"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
threads = int(os.environ.get("GUNICORN_THREADS", "64"))

timeout = int(os.environ.get("GUNICORN_TIMEOUT", "660"))
"""Seconds a silent worker process may live; above JOB_TIMEOUT_S (600) so a long /generate is never cut."""

graceful_timeout = 30
"""On restart, give requests in flight this long; streams reconnect with Last-Event-ID."""

keepalive = 75
"""Seconds an idle HTTP keep-alive connection stays open (longer than typical load balancer idle timeouts)."""

accesslog = "-"
errorlog = "-"

# --- Logs and metrics (README, "Monitoring") -------------------------------------------------------------
# gunicorn put the repository root (its chdir) on sys.path before reading this file.
from shared import logs, metrics  # noqa: E402
from shared.settings import Settings  # noqa: E402

logconfig_dict = logs.dict_config(Settings.from_env())
"""Gunicorn's own lines in LOG_FORMAT too; the API writes one access line per request (with its ids)."""

metrics_dir, _ = metrics.prepare_multiprocess_dir(os.environ.get("PROMETHEUS_MULTIPROC_DIR", ""))
"""prometheus-client's multiprocess mode: each API process keeps its values here; /metrics adds them up."""


def on_starting(server):
    """A new master: start the counts from zero (files of an earlier run would add to them)."""
    metrics.clear_multiprocess_dir(metrics_dir)


def child_exit(server, worker):
    """An API process ended: its in-progress gauge no longer counts."""
    metrics.mark_process_dead(worker.pid)


def on_exit(server):
    """Remove the metrics folder if it is one this file made."""
    metrics.remove_made_multiprocess_dir(metrics_dir)
