"""API test fixtures: an app on an in-process fakeredis, its test client, and fake live RQ workers.

The app's model folder is the tiny tokenizer's (tests/tiny_tokenizer.py): the API tests need no weights.
"""

from __future__ import annotations

import gc
from pathlib import Path

import fakeredis
import pytest
from rq import Queue, Worker

from api import create_app
from tests.tiny_tokenizer import make_tokenizer_folder


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """The tiny tokenizer's model folder (no weights), made once per test session."""
    return make_tokenizer_folder(tmp_path_factory.mktemp("tiny-tokenizer"))


@pytest.fixture
def redis_client():
    """An empty in-process Redis of its own for each test."""
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    yield client
    # Close what the test left open (a stream's response cancels its job through Redis as it closes) now, while
    # nothing else runs: left to the garbage collector, it closed in the middle of a later test's fakeredis
    # command, and fakeredis's lock is not re-entrant (the suite hung).
    gc.collect()
    client.flushall()


@pytest.fixture
def app_config(redis_client, tiny_tokenizer_dir) -> dict:
    """The config `app` is built with; a test may build another app from a modified copy."""
    return {"TESTING": True, "REDIS_CLIENT": redis_client, "MODEL_DIR": str(tiny_tokenizer_dir),
            "BACKEND_MODE": "auto", "MAX_SEQ_LEN": 128, "DEFAULT_MAX_TOKENS": 32, "MAX_NEW_TOKENS_LIMIT": 64,
            "KEEPALIVE_S": 5.0}


@pytest.fixture
def app(app_config):
    """The API app on the test's fakeredis."""
    return create_app(app_config)


@pytest.fixture
def client(app):
    """Flask's test client for `app`."""
    return app.test_client()


@pytest.fixture
def live_worker(redis_client):
    """Register a live RQ worker for a pool (as a real worker's start does); returns the rq Worker."""
    def register(pool: str) -> Worker:
        worker = Worker([Queue(pool, connection=redis_client)], connection=redis_client)
        worker.register_birth()
        return worker
    return register


@pytest.fixture
def starting_worker(redis_client):
    """Register a worker of a pool as a batching worker does before it loads its model (state `starting`, slots
    from its settings); returns the worker, whose `register_birth()` (as RQ's bootstrap calls it) makes it ready."""
    from shared.settings import Settings
    from workers.batching import BatchingWorker  # imports torch: only the tests that use this fixture pay for it

    def register(pool: str, **settings) -> BatchingWorker:
        worker = BatchingWorker([pool], connection=redis_client, settings=Settings.from_env({}, **settings))
        worker.register_birth()
        return worker
    return register


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` skip cleanly where torch sees no CUDA device (torch is imported only when one is there)."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in gpu_items:
        item.add_marker(skip)


# Session-scoped fixtures: the real processes of the integration tests (one service for every module that
# uses it) and the tiny model.
from tests.secured_fleet import secured  # noqa: E402,F401
from tests.service_fixtures import service, tiny_service  # noqa: E402,F401
from tests.tiny_model import tiny_weights  # noqa: E402,F401
