"""The app's shared clients, kept in `app.extensions`: settings, the Redis client, the event hub, the lazy
tokenizer."""

from __future__ import annotations

import threading
from dataclasses import fields

import redis
from flask import Flask, current_app

from shared.fanout import EventHub
from shared.settings import Settings
from shared.tokenizer import TextTokenizer, load_tokenizer

EXTENSION_KEY = "llm_api"
"""Key of this app's entry in `app.extensions`."""

REDIS_CONNECT_TIMEOUT_S = 5.0
"""How long to wait for Redis to accept a connection (or for a free one in the pool) before answering 503."""

REDIS_MAX_CONNECTIONS = 64
"""Redis connections one API process opens at most for commands (its event hub holds one more, for pub/sub):
as many as it has threads by default (GUNICORN_THREADS). With 16, a crowd's admission checks queued for a free
connection behind each other (the most common wait in a profile of the API under `bench.load`)."""


def settings_as_config(settings: Settings) -> dict:
    """Settings as Flask config entries, one upper-case key per field."""
    return {field.name.upper(): getattr(settings, field.name) for field in fields(Settings)}


def settings_from_config(config: dict) -> Settings:
    """Settings rebuilt from the (possibly overridden) config entries, validated."""
    values = {field.name: config[field.name.upper()] for field in fields(Settings) if field.name.upper() in config}
    return Settings.from_env({}, **values)


class LazyTokenizer:
    """Loads the model's tokenizer on first use, once per process, so app start stays cheap."""

    def __init__(self, folder: str):
        self.folder = folder
        self._tokenizer: TextTokenizer | None = None
        self._lock = threading.Lock()

    def get(self) -> TextTokenizer:
        """The tokenizer, loading it now if no request has needed it yet."""
        if self._tokenizer is None:
            with self._lock:
                if self._tokenizer is None:
                    self._tokenizer = load_tokenizer(self.folder)
        return self._tokenizer


def init_app(app: Flask) -> None:
    """Create the settings, Redis client and tokenizer holder for `app`."""
    settings = settings_from_config(app.config)
    client = app.config.get("REDIS_CLIENT")
    if client is None:
        # Connects lazily: a Redis that is down shows up as 503s, not as a failed start. The pool is bounded:
        # a process's hundreds of stream threads share a few connections (each command holds one for
        # a round trip) instead of keeping one open per thread that ever ran a command.
        pool = redis.BlockingConnectionPool.from_url(
            settings.redis_url, max_connections=REDIS_MAX_CONNECTIONS, timeout=REDIS_CONNECT_TIMEOUT_S,
            socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S)
        client = redis.Redis(connection_pool=pool)
    app.extensions[EXTENSION_KEY] = {
        "settings": settings,
        "redis": client,
        "events": EventHub(client),  # the process's one pub/sub connection, shared by its streams
        "tokenizer": LazyTokenizer(str(settings.model_path)),
    }


def get_settings() -> Settings:
    """The current app's settings."""
    return current_app.extensions[EXTENSION_KEY]["settings"]


def get_redis() -> redis.Redis:
    """The current app's Redis client."""
    return current_app.extensions[EXTENSION_KEY]["redis"]


def get_hub() -> EventHub:
    """The current app's event hub (every stream's wake-ups)."""
    return current_app.extensions[EXTENSION_KEY]["events"]


def interrupt_streams(app: Flask) -> int:
    """End `app`'s open event streams with a resumable `error` event (the process is stopping); how many."""
    return app.extensions[EXTENSION_KEY]["events"].interrupt_streams()


def get_tokenizer() -> TextTokenizer:
    """The current app's tokenizer (loaded on first call)."""
    return current_app.extensions[EXTENSION_KEY]["tokenizer"].get()
