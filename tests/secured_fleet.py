"""A fleet as an operator exposing the service to a team would run it, for the security and monitoring tests:
gunicorn (two processes) with API keys, a per-key limit, CORS and JSON logs, and one CPU worker with JSON
logs, from the Procfile, on a redis-server of its own (a spare port), so its counts are only the tests'.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from tests.service_fixtures import RedisServer, Service, free_port, service_environment

ALICE = "sk-alice-integration-0001"
"""A named key of API_KEYS (`alice:...`)."""
BOB = "sk-bob-integration-0002"
"""A key of API_KEYS_FILE (`bob ...`)."""
CAROL = "sk-carol-integration-0003"
"""An unnamed key of API_KEYS, for the per-key limit test alone."""
KEYS = (ALICE, BOB, CAROL)

PER_KEY_LIMIT = 2
ORIGIN = "https://team.example"
WORKER_DEAD_S = 4
"""Short, so a worker pushes its metrics every second (WORKER_DEAD_S / 4)."""


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@dataclass
class SecuredFleet:
    service: Service
    metrics_dir: Path

    def url(self, path: str) -> str:
        return self.service.url(path)

    def log_text(self, kind: str) -> str:
        """What a process has written so far (`web` or `cpu`)."""
        return self.service.logs[f"secured-{kind}"].read_text()

    def log_lines(self, kind: str) -> list[str]:
        """The non-empty lines a process has written so far (`web` or `cpu`)."""
        return [line for line in self.log_text(kind).splitlines() if line.strip()]


@pytest.fixture(scope="session")
def secured(tmp_path_factory):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    folder = tmp_path_factory.mktemp("secured")
    keys_file = folder / "keys"
    keys_file.write_text(f"# the team's keys\nbob:{BOB}\n")
    metrics_dir = folder / "metrics"
    server = RedisServer()
    server.start()
    port = free_port()
    env = service_environment(
        port, REDIS_URL=server.url, API_KEYS=f"alice:{ALICE},{CAROL}", API_KEYS_FILE=str(keys_file),
        MAX_CONCURRENT_PER_KEY=str(PER_KEY_LIMIT), CORS_ORIGINS=ORIGIN, LOG_FORMAT="json",
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir), WEB_CONCURRENCY="2", WORKER_DEAD_S=str(WORKER_DEAD_S),
        COMPILE_DECODE="0", TORCH_THREADS="1", MAX_SEQ_LEN="512")
    service = Service(f"http://127.0.0.1:{port}", redis.Redis.from_url(server.url), {}, {})
    service.env = env
    try:
        service.start("web", env, name="secured-web")  # log files of their own, beside the session's service
        service.start("cpu", env, name="secured-cpu")
        service.wait_for_workers("cpu")
        yield SecuredFleet(service, metrics_dir)
    finally:
        service.stop_all()
        server.stop()
