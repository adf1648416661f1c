"""Gunicorn settings for the API: `gunicorn -c deploy/gunicorn.conf.py 'api:create_app()'`.

Every open event stream (and every blocking /generate) holds one thread for its whole life, so the
workers are threaded: WEB_CONCURRENCY processes x GUNICORN_THREADS threads is the number of requests
served at once. A config file is read once when gunicorn starts, so reading the environment here is fine.

Stopping (SIGTERM to gunicorn, a redeploy, `kill -HUP` for new workers): each worker process stops
accepting, ends its open event streams at once with an `error` event (`unavailable`, no id) that the client
resumes from with Last-Event-ID on any API process, since the job runs on in its worker; blocking
requests get GUNICORN_GRACEFUL_TIMEOUT seconds to finish.
"""

import os
import signal

bind = f"0.0.0.0:{os.environ.get('PORT', '8080')}"
"""Listen on every interface, on PORT (default 8080)."""

worker_class = "api.server.JsonErrorWorker"
"""gthread, except that what gunicorn refuses itself is a JSON error (api/server.py): a request line over 4094
bytes (414), over 100 headers or one over 8190 bytes (431), a malformed request (400): gunicorn's default limits."""
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
threads = int(os.environ.get("GUNICORN_THREADS", "64"))

timeout = int(os.environ.get("GUNICORN_TIMEOUT", "660"))
"""Seconds a silent worker process may live; above JOB_TIMEOUT_S (600) so a long /generate is never cut."""

graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", "30"))
"""On stop or restart, how long requests in flight may finish (streams end at once and resume elsewhere)."""

keepalive = 75
"""Seconds an idle HTTP keep-alive connection stays open (longer than typical load balancer idle timeouts)."""

accesslog = "-"
errorlog = "-"
"""Both to stderr/stdout: journald under systemd, `docker logs` in a container."""


def post_worker_init(worker):
    """Make this worker's SIGTERM also end its open event streams (after gunicorn's own handler)."""
    stop = worker.handle_exit

    def handle_exit(signum, frame):
        stop(signum, frame)
        end_streams(worker)

    signal.signal(signal.SIGTERM, handle_exit)


def worker_int(worker):
    """SIGINT or SIGQUIT (a quick stop): end the open streams too, in the moment gunicorn gives them."""
    end_streams(worker)


def end_streams(worker):
    """End the worker's open event streams with their resumable `error` event."""
    from api.extensions import interrupt_streams

    try:
        count = interrupt_streams(worker.wsgi)
    except (AttributeError, KeyError):  # the WSGI callable is not the API app as `create_app` made it
        worker.log.warning("open event streams were not ended: the WSGI app is not the API's")
        return
    worker.log.info("stopping: ended %d open event streams (clients resume with Last-Event-ID)", count)


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
