"""CORS: pages served from the origins in CORS_ORIGINS may call the API from a browser; none by default.

Allowed origins get `Access-Control-Allow-Origin` on every answer (errors included, so a page can read a
401 or a 429), the headers a client needs exposed (`X-Job-Id`, `X-Request-Id`, `Retry-After`...), and an
answer to their preflights (`OPTIONS`, which needs no API key) that allows `Authorization`. Keys are sent
as a header, never as cookies, so credentials are not allowed. `*` allows any origin.
"""

from __future__ import annotations

from flask import Flask, Response, current_app, request

EXTENSION_KEY = "llm_cors"

ALLOWED_METHODS = "GET, POST, DELETE, OPTIONS"
ALLOWED_HEADERS = "Authorization, Content-Type, Last-Event-ID, X-Request-Id"
EXPOSED_HEADERS = "X-Job-Id, X-Request-Id, X-Messages-Dropped, Retry-After, Retry-After-Ms, Location"
MAX_AGE_S = 600
"""How long a browser may reuse a preflight's answer."""


def init_app(app: Flask, origins: list[str]) -> None:
    """Answer allowed origins (nothing is added when CORS_ORIGINS is empty)."""
    if not origins:
        return
    app.extensions[EXTENSION_KEY] = frozenset(origin.rstrip("/") for origin in origins)
    app.after_request(add_cors_headers)


def add_cors_headers(response: Response) -> Response:
    origin = request.headers.get("Origin")
    allowed = current_app.extensions[EXTENSION_KEY]
    response.vary.add("Origin")
    if origin is None or not ("*" in allowed or origin in allowed):
        return response
    response.headers["Access-Control-Allow-Origin"] = "*" if "*" in allowed else origin
    response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        response.headers["Access-Control-Allow-Methods"] = ALLOWED_METHODS
        response.headers["Access-Control-Allow-Headers"] = ALLOWED_HEADERS
        response.headers["Access-Control-Max-Age"] = str(MAX_AGE_S)
    return response
