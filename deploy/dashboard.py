"""rq-dashboard on the service's Redis, reading its JSON-serialised jobs: queues, workers, jobs.

    REDIS_URL=redis://... gunicorn -b 127.0.0.1:9181 'deploy.dashboard:create_app()'

then open http://127.0.0.1:9181/rq-dashboard/ (`RQ_DASHBOARD_URL_PREFIX` moves it; rq-dashboard reads
`RQ_DASHBOARD_REDIS_URL`, else `REDIS_URL`, and `RQ_DASHBOARD_USERNAME`/`RQ_DASHBOARD_PASSWORD` for basic
auth). rq-dashboard's own JSON switch covers its job pages but not its workers page, which reads each busy
worker's current job with RQ's default (pickle) serializer and fails on ours; here the workers are read
with RQ's JSON serializer too.
"""

from __future__ import annotations

import rq_dashboard.web
from flask import Flask
from rq import Worker
from rq.serializers import JSONSerializer
from rq_dashboard.app import create_app as create_dashboard


class JSONWorker(Worker):
    """RQ's worker record, its current job read as JSON (as every job of this service is written)."""

    @classmethod
    def all(cls, *args, serializer=JSONSerializer, **kwargs):
        return super().all(*args, serializer=serializer, **kwargs)


def create_app() -> Flask:
    """rq-dashboard's app with this service's serializer for jobs and workers alike."""
    app = create_dashboard()
    rq_dashboard.web.config.serializer = JSONSerializer
    rq_dashboard.web.Worker = JSONWorker  # the name its workers page looks up when it runs
    return app
