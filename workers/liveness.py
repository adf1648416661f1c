"""A worker's heartbeat, beating on its own thread, and its watch over the other workers of its pools.

RQ refreshes heartbeats from its main loop, which a batch step can hold for a while; a thread keeps the
worker's key and its running jobs' execution heartbeats (all with a TTL of WORKER_DEAD_S) fresh whatever
the step does, four times per TTL. So a worker that stops beating has died, and within WORKER_DEAD_S its
key expires (`/health` and routing stop counting it) and its jobs' heartbeats lapse. The same thread then
recovers the jobs of workers that died (`shared/recovery.py`): the survivors watch each other.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from shared.lanes import pool_of
from shared.recovery import recover_abandoned

if TYPE_CHECKING:
    from workers.batching import BatchingWorker

log = logging.getLogger(__name__)

BEATS_PER_TTL = 4
"""Heartbeats within one WORKER_DEAD_S: three may be late or lost before the worker counts as dead."""


class Liveness(threading.Thread):
    """Beats for `worker` and recovers its pools' abandoned jobs until `stop()`."""

    def __init__(self, worker: BatchingWorker):
        super().__init__(name=f"liveness-{worker.name}", daemon=True)
        self.worker = worker
        self.interval_s = worker.settings.worker_dead_s / BEATS_PER_TTL
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            try:
                self.beat()
                for queue in self.worker.queues:
                    recover_abandoned(self.worker.connection, queue.name, self.worker.settings)
                self.push_metrics()
            except RedisError as exc:  # Redis may be restarting: beat again at the next interval
                log.warning("worker %s: heartbeat failed: %s", self.worker.name, exc)

    def beat(self) -> None:
        """Refresh the worker's key and the execution heartbeat of every job it runs."""
        self.worker.ensure_registered()
        running = list(self.worker.running.values())  # the main thread adds and removes entries meanwhile
        for entry in running:
            self.worker.maintain_heartbeats(entry.job, entry.execution)
        if not running:
            self.worker.heartbeat()

    def push_metrics(self) -> None:
        """Leave the worker's metrics in Redis for the API's /metrics, as long-lived as its heartbeat."""
        worker = self.worker
        try:
            pools = list(dict.fromkeys(pool_of(name) for name in worker.queue_names()))  # its lanes are one pool
            worker.metrics.push(worker.connection, worker.name, pools, worker.settings.worker_dead_s)
        except RedisError:
            raise
        except Exception:  # noqa: BLE001 - metrics must never stop the heartbeat
            log.exception("worker %s: could not push its metrics", worker.name)

    def stop(self) -> None:
        """End the thread (the worker is shutting down)."""
        self.stopped.set()
