"""API keys: with API_KEYS (or API_KEYS_FILE) set, every route except the open ones (OPEN_ROUTES) wants
`Authorization: Bearer <key>`, and answers 401 without a valid one (OpenAI's error shape on /v1, so the
official clients' `api_key` works).

A key is `[name:]key`. Only its SHA-256 is kept in memory and recorded in Redis (as the owner of the jobs it
creates, `api/jobs/tracking.py`); logs and metrics name a key by its name, or `key-` and the first 8 hex
digits of its SHA-256 when it has none. The key itself is never logged.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from flask import Flask, current_app, g, has_request_context, request

from shared.exceptions import ConfigurationError, MissingApiKeyError, UnauthorizedError
from shared.settings import Settings

EXTENSION_KEY = "llm_auth"
"""`app.extensions` entry: the app's `KeyRing` and open routes."""


@dataclass(frozen=True, slots=True)
class ApiKey:
    """Who a request comes from, as far as the service knows and may say."""

    name: str
    """From the `name:key` entry, else `key-<8 hex digits>`: what logs and metrics show."""
    owner: str
    """The key's SHA-256 (hex): what Redis records as the owner of its jobs and batches."""


def digest(key: str) -> str:
    """The SHA-256 of a key, in hex."""
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRing:
    """The accepted keys, by their SHA-256."""

    def __init__(self, keys: dict[str, ApiKey]):
        self.keys = keys

    @property
    def enabled(self) -> bool:
        """Whether requests need a key at all (some key is configured)."""
        return bool(self.keys)

    def find(self, presented: str) -> ApiKey | None:
        """The key presented, if it is one of ours."""
        return self.keys.get(digest(presented))

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        """The keys of API_KEYS (comma-separated) and of API_KEYS_FILE (one a line, `#` comments)."""
        entries = [(f"API_KEYS entry {number}", entry)
                   for number, entry in enumerate(settings.split_list(settings.api_keys), start=1)]
        if settings.api_keys_file:
            path = Path(settings.api_keys_file)
            try:
                lines = path.read_text().splitlines()
            except OSError as exc:
                raise ConfigurationError(f"API_KEYS_FILE {path} cannot be read: {exc.strerror}") from exc
            entries += [(f"{path} line {number}", line.strip()) for number, line in enumerate(lines, start=1)
                        if line.strip() and not line.strip().startswith("#")]
        keys: dict[str, ApiKey] = {}
        for where, entry in entries:
            name, key = parse_entry(entry, where)
            owner = digest(key)
            if owner in keys:
                raise ConfigurationError(f"{where} repeats a key given before (as {keys[owner].name!r})")
            keys[owner] = ApiKey(name or f"key-{owner[:8]}", owner)
        return cls(keys)


def parse_entry(entry: str, where: str) -> tuple[str | None, str]:
    """`name:key` or `key`; the messages name the entry's place, never the key."""
    name, colon, key = entry.partition(":")
    if not colon:
        name, key = None, entry
    name = name.strip() if name is not None else None
    key = key.strip()
    if colon and not name:
        raise ConfigurationError(f"{where} has an empty name before ':'")
    if not key:
        raise ConfigurationError(f"{where} has no key")
    if any(character.isspace() or character == "," for character in key):
        raise ConfigurationError(f"{where}: a key may not contain spaces or commas")
    return name, key


def is_open(path: str, open_routes: list[str]) -> bool:
    """Whether `path` is one of the open routes or below one (`/docs` opens `/docs/assets/...`; `/` only `/`)."""
    for route in open_routes:
        route = route.rstrip("/") or "/"
        if path == route or (route != "/" and path.startswith(route + "/")):
            return True
    return False


def init_app(app: Flask, settings: Settings) -> None:
    """Read the keys (a bad file stops the start) and check every request's key before its view runs."""
    app.extensions[EXTENSION_KEY] = {"keys": KeyRing.from_settings(settings),
                                     "open_routes": settings.split_list(settings.open_routes)}
    app.before_request(authenticate)


def authenticate() -> None:
    """401 unless keys are off, the route is open, it is a CORS preflight, or the Bearer key is ours."""
    state = current_app.extensions[EXTENSION_KEY]
    if not state["keys"].enabled or request.method == "OPTIONS" or is_open(request.path, state["open_routes"]):
        return
    header = request.headers.get("Authorization", "").strip()
    if not header:
        raise MissingApiKeyError("this server needs an API key: send it as `Authorization: Bearer <key>`")
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        raise UnauthorizedError("the Authorization header must be `Bearer <key>`")
    key = state["keys"].find(presented.strip())
    if key is None:
        raise UnauthorizedError("the API key is not valid")
    g.api_key = key


def current_key() -> ApiKey | None:
    """The key of the request being served (None when keys are off, or on an open route without one)."""
    return g.get("api_key") if has_request_context() else None
