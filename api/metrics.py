"""`GET /metrics`: Prometheus metrics of the API processes, of the pools and of every worker, in one scrape.

- The API's own metrics (requests by route, method and status; their duration; requests in progress;
  cancellations) are counted by each gunicorn process in prometheus-client's multiprocess mode: values
  live in files under PROMETHEUS_MULTIPROC_DIR (`deploy/gunicorn.conf.py` sets it up) and any process's
  `/metrics` adds up every process's files. Without that variable (`python -m api`, tests) the process's
  own registry is read. A 429 (the admission bound, a key's limit) is a request like any other, counted
  under its status.
- The pools' queue depth and live workers, and whether Redis answers, are read from Redis at scrape time.
- The workers' metrics (batch size, step time, KV positions, token and latency histograms...) are their
  snapshots in Redis (`shared/metrics.py`), each sample labelled with its `worker` and `pool`.
"""

from __future__ import annotations

import json
import logging
import os
import time

import redis
from flask import Blueprint, Flask, Response, g, request
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from rq import Queue

from api.errors import REDIS_DOWN
from api.extensions import get_redis
from api.jobs.routing import worker_counts
from api.openapi import Media, Reply, operation
from shared.lanes import LANES, queue_name
from shared.metrics import MULTIPROC_ENV, WORKER_SET, worker_key
from shared.settings import BACKENDS

log = logging.getLogger(__name__)

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
"""Seconds; up to JOB_TIMEOUT_S, since a stream is one request for its whole life."""

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
"""Methods kept as label values (anything else is `other`: a label must not take arbitrary values)."""

REQUESTS = Counter("llm_http_requests", "HTTP requests answered, by route (its template), method and status.",
                   ["route", "method", "status"])
DURATION = Histogram("llm_http_request_duration_seconds",
                     "From a request's arrival to its response's last byte (a stream's whole life).",
                     ["route", "method"], buckets=DURATION_BUCKETS)
IN_PROGRESS = Gauge("llm_http_requests_in_progress", "Requests being served now, open streams included.",
                    multiprocess_mode="livesum")
CANCELLATIONS = Counter("llm_job_cancellations", "Jobs the API asked to stop: `requested` (DELETE /jobs/<id>) or "
                        "`client_left` (the client of a stream or a blocking call hung up).", ["reason"])


def init_app(app: Flask) -> None:
    """Count every request and serve /metrics."""
    app.before_request(start_request)
    app.after_request(count_request)
    app.teardown_request(end_uncounted)
    app.register_blueprint(bp)


class InFlight:
    """A request counted in IN_PROGRESS, until it ends (once)."""

    def __init__(self):
        self.started = time.monotonic()
        self.route, self.method = route_label(), method_label()
        self.ended = False
        IN_PROGRESS.inc()

    def end(self) -> None:
        if self.ended:
            return
        self.ended = True
        IN_PROGRESS.dec()
        DURATION.labels(self.route, self.method).observe(time.monotonic() - self.started)


def route_label() -> str:
    """The matched route's template (`/jobs/<job_id>`), or `unmatched`: never the raw path."""
    return request.url_rule.rule if request.url_rule is not None else "unmatched"


def method_label() -> str:
    return request.method if request.method in METHODS else "other"


def start_request() -> None:
    g.in_flight = InFlight()


def count_request(response: Response) -> Response:
    """Count the request now, before its body goes out (a client that has its answer sees it counted); its
    duration once the response is closed."""
    REQUESTS.labels(route_label(), method_label(), str(response.status_code)).inc()
    in_flight = g.pop("in_flight", None)
    if in_flight is not None:
        response.call_on_close(in_flight.end)
    return response


def end_uncounted(_error: BaseException | None) -> None:
    in_flight = g.pop("in_flight", None)
    if in_flight is not None:
        in_flight.end()


def count_cancellation(reason: str) -> None:
    """One job the API asked to stop (`requested` or `client_left`)."""
    CANCELLATIONS.labels(reason).inc()


# --- the scrape ------------------------------------------------------------------------------------------

bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
@operation("Prometheus metrics", tag="service", responses={200: Reply(
    "Prometheus' text exposition format: the API's requests, the pools' queues and workers, every worker's "
    "batching and latency metrics (README, \"Monitoring\").",
    (Media("text/plain", schema={"type": "string"}),))})
def metrics() -> Response:
    """Every API process's counts added up, the pools as Redis sees them now, and each worker's latest
    snapshot (labelled `worker` and `pool`)."""
    if os.environ.get(MULTIPROC_ENV):
        processes = CollectorRegistry(auto_describe=False)
        MultiProcessCollector(processes)
    else:
        processes = REGISTRY
    fleet = CollectorRegistry(auto_describe=False)
    fleet.register(FleetCollector(get_redis()))
    return Response(generate_latest(processes) + generate_latest(fleet), mimetype=None,
                    content_type=CONTENT_TYPE_PLAIN_0_0_4)


class FleetCollector:
    """The pools and the workers, read from Redis at scrape time."""

    def __init__(self, connection: redis.Redis):
        self.connection = connection

    def collect(self):
        up = GaugeMetricFamily("llm_redis_up", "Whether Redis answered this scrape (1) or not (0).")
        try:
            pools = list(self.pools())
            workers = list(self.workers())
        except REDIS_DOWN as exc:
            log.warning("metrics: redis unavailable: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from pools
        yield from workers

    def pools(self):
        depth = GaugeMetricFamily("llm_queue_depth", "Jobs waiting in a lane of the pool for a worker.",
                                  labels=["pool", "lane"])
        for pool in BACKENDS:
            for lane in LANES:
                queue = Queue(queue_name(pool, lane), connection=self.connection)
                depth.add_metric([pool, lane.value], self.connection.llen(queue.key))
        live = GaugeMetricFamily("llm_live_workers", "Workers of the pool that are alive (heart-beating), by "
                                 "state: ready to take jobs, or still loading their model.", labels=["pool", "state"])
        for pool, counts in worker_counts(self.connection).items():
            for state, count in counts.items():
                live.add_metric([pool, state], count)
        return [depth, live]

    def workers(self):
        """Every live worker's snapshot, merged family by family, each sample labelled with its worker and pool."""
        names = sorted(name.decode() for name in self.connection.smembers(WORKER_SET))
        snapshots = self.connection.mget([worker_key(name) for name in names]) if names else []
        expired = [name for name, snapshot in zip(names, snapshots) if snapshot is None]
        if expired:
            self.connection.srem(WORKER_SET, *expired)
        families: dict[str, Metric] = {}
        for snapshot in snapshots:
            if snapshot is None:
                continue
            data = json.loads(snapshot)
            labels = {"worker": data["worker"], "pool": data["pools"]}
            for family in text_string_to_metric_families(data["metrics"]):
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(family.name, family.documentation, family.type)
                for sample in family.samples:
                    merged.add_sample(sample.name, {**sample.labels, **labels}, sample.value)
        return families.values()
