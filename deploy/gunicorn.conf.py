"""Gunicorn settings for the API: `gunicorn -c deploy/gunicorn.conf.py 'api:create_app()'`.

Every open event stream (and every blocking /generate) holds one thread for its whole life, so the
workers are threaded: WEB_CONCURRENCY processes x GUNICORN_THREADS threads is the number of requests
served at once. A config file is read once when gunicorn starts, so reading the environment here is fine.
"""

import os

bind = f"0.0.0.0:{os.environ.get('PORT', '8080')}"
"""Listen on every interface, on PORT (default 8080)."""

worker_class = "api.server.JsonErrorWorker"
"""gthread, except that what gunicorn refuses itself is a JSON error (api/server.py): a request line over 4094
bytes (414), over 100 headers or one over 8190 bytes (431), a malformed request (400): gunicorn's default limits."""
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
