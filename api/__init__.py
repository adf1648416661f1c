"""The HTTP front end: validates requests, routes them to a worker pool over RQ, relays events as SSE.

Nothing here imports torch: the tokenizer comes from `shared.tokenizer` (tokenizers + jinja2 only).
The request path is mapped in docs/DESIGN.md; in short: `routes/` (and `openai/`) parse a body with a
`models/` class, `prompts` turns it into token ids that fit the context, `jobs/` enqueues the job and
relays its events.
"""

from __future__ import annotations

from flask import Flask

from api import access, auth, cors, errors, extensions, limits, metrics, openapi
from api.jobs import tracking
from api.openai import routes as openai_routes
from api.routes import batches, chat, demo, generate, health, jobs, tokenizer
from shared.settings import Settings

MAX_CONTENT_LENGTH = 1 << 20
"""Largest request body accepted (bytes); bigger bodies get a 413 JSON error."""


def create_app(test_config: dict | None = None) -> Flask:
    """Build the app: settings from the environment, then `FLASK_*` variables, then `test_config`.

    Config keys named after `Settings` fields in upper case (`REDIS_URL`, `MAX_SEQ_LEN`, ...) override
    those settings; `REDIS_CLIENT` injects a ready Redis client (tests pass a fakeredis one).
    """
    app = Flask(__name__, static_folder=None)
    app.config.from_mapping(extensions.settings_as_config(Settings.from_env()),
                            MAX_CONTENT_LENGTH=MAX_CONTENT_LENGTH, REDIS_CLIENT=None)
    app.config.from_prefixed_env()
    if test_config is not None:
        app.config.from_mapping(test_config)
    extensions.init_app(app)
    errors.init_app(app)
    settings = extensions.settings_from_config(app.config)
    # Request hooks, in the order they run: the request id, the metrics, the key, the owner of the job or
    # batch named, the key's limit; the access line and the metrics go last (after_request runs backwards).
    access.init_app(app)
    metrics.init_app(app)
    auth.init_app(app, settings)
    tracking.init_app(app)
    limits.init_app(app, settings.max_concurrent_per_key)
    cors.init_app(app, settings.split_list(settings.cors_origins))
    for blueprint in (generate.bp, chat.bp, batches.bp, jobs.bp, health.bp, tokenizer.bp, openapi.bp, demo.bp):
        app.register_blueprint(blueprint)
    openai_routes.init_app(app)
    return app
