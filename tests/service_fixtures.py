"""Real processes for integration tests: the Procfile's `web` and `cpu` lines against a real Redis.

The processes are started exactly as the Procfile says (through bash, from the repository root, with
`.venv/bin` on the PATH), with their own Redis database, and stopped at the end of the session.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import requests

ROOT = Path(__file__).resolve().parent.parent
TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://localhost:6379/13")
STARTUP_TIMEOUT_S = 180


def procfile_commands() -> dict[str, str]:
    """Process type -> command line, as written in the Procfile."""
    lines = (ROOT / "Procfile").read_text().splitlines()
    return dict(line.split(":", 1) for line in lines if line.strip() and not line.startswith("#"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Service:
    """A running API with its worker processes."""

    base_url: str
    redis: redis.Redis
    processes: dict[str, subprocess.Popen]
    logs: dict[str, Path]

    def url(self, path: str) -> str:
        return self.base_url + path

    def start(self, kind: str, env: dict[str, str], name: str | None = None,
              command: str | None = None) -> subprocess.Popen:
        """Start the Procfile's `kind` line (or `command` instead) as process `name`, its output to a log file."""
        name = name or kind
        log = self.logs.setdefault(name, Path(os.environ.get("TMPDIR", "/tmp")) / f"llm-test-{name}-{os.getpid()}.log")
        process = subprocess.Popen(["bash", "-c", command or procfile_commands()[kind].strip()], cwd=ROOT, env=env,
                                   stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        self.processes[name] = process
        return process

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)

    def wait_for_workers(self, pool: str, count: int = 1) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                health = requests.get(self.url("/health"), timeout=2).json()
                if health.get("workers", {}).get(pool, 0) >= count:
                    return
            except (requests.ConnectionError, requests.Timeout):  # not listening yet, or slow on a busy machine
                pass
            time.sleep(0.2)
        raise TimeoutError(f"no {pool} worker registered within {STARTUP_TIMEOUT_S} s")

    def check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}:\n{self.logs[name].read_text()[-3000:]}")


class RedisServer:
    """A redis-server of a test module's own on a spare port, without persistence, that a test may restart."""

    def __init__(self):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                         "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(self.url).ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


@contextlib.contextmanager
def own_redis_server() -> Iterator[RedisServer]:
    """A started redis-server of the caller's own (the test skips without redis-server), stopped at the end unless
    the test stopped it already."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        if server.process.poll() is None:
            server.stop()


@contextlib.contextmanager
def private_queue(prefix: str) -> Iterator[tuple[redis.Redis, str]]:
    """A queue name of the test's own on the real Redis; every key naming it is deleted afterwards."""
    connection = redis.Redis.from_url(TEST_REDIS_URL)
    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    yield connection, name
    for key in connection.scan_iter(match=f"*{name}*", count=1000):
        connection.delete(key)
    for key in (b"rq:queues", b"rq:workers"):
        for member in connection.smembers(key):
            if name.encode() in member:
                connection.srem(key, member)


def tiny_environment(port: int, redis_url: str, weights: Path, **extra: str) -> dict[str, str]:
    """The processes' environment for the tiny model on `redis_url`: eager decoding on one thread, quick to start."""
    return service_environment(port, REDIS_URL=redis_url, MODEL_DIR=str(weights), COMPILE_DECODE="0",
                               TORCH_THREADS="1", **extra)


def service_environment(port: int, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PATH=f"{ROOT / '.venv' / 'bin'}:{env.get('PATH', '')}", PORT=str(port), REDIS_URL=TEST_REDIS_URL,
               BACKEND_MODE="auto", MODEL_DIR=str(ROOT / "weights"), WEB_CONCURRENCY="2",
               MAX_SEQ_LEN="1024", MAX_BATCH_SIZE="32", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def service():
    """gunicorn (web) and one CPU worker, from the Procfile, on a free port and a test Redis database."""
    connection = redis.Redis.from_url(TEST_REDIS_URL)
    connection.flushdb()
    port = free_port()
    env = service_environment(port)
    running = Service(f"http://127.0.0.1:{port}", connection, {}, {})
    running.env = env
    try:
        running.start("web", env)
        running.start("cpu", env)
        running.wait_for_workers("cpu")
        yield running
    finally:
        running.stop_all()
        connection.flushdb()
        print(f"service logs: {running.logs}", file=sys.stderr)


@pytest.fixture(scope="session")
def tiny_service(tiny_weights):
    """gunicorn (web) and one CPU worker (cpu) from the Procfile, serving the tiny model (tests/tiny_model.py) on
    a redis-server of their own: the real processes, quick to start and to answer, for tests of the HTTP surface.

    MAX_NEW_TOKENS_LIMIT and MAX_BATCH_PROMPTS are small (the document states them, so fuzzed requests stay
    small too), but not below what the document's examples ask for; so is DEFAULT_MAX_TOKENS."""
    with own_redis_server() as server:
        port = free_port()
        env = tiny_environment(port, server.url, tiny_weights, MAX_NEW_TOKENS_LIMIT="32", MAX_BATCH_PROMPTS="4",
                               DEFAULT_MAX_TOKENS="4")
        running = Service(f"http://127.0.0.1:{port}", redis.Redis.from_url(server.url), {}, {})
        running.env = env
        try:
            running.start("web", env, name="tiny-web")
            running.start("cpu", env, name="tiny-cpu")
            running.wait_for_workers("cpu")
            yield running
        finally:
            running.stop_all()
            print(f"service logs: {running.logs}", file=sys.stderr)
