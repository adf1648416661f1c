"""`GET /`: a demo page (prompt or chat, live token stream, stop button, beam candidates) from api/static."""

from __future__ import annotations

from flask import Blueprint, send_from_directory

from api.openapi import STATIC_DIR, Media, Reply, operation

bp = Blueprint("demo", __name__, static_folder=str(STATIC_DIR), static_url_path="/static")


@bp.get("/")
@operation("Demo page", tag="docs", responses={200: Reply("An HTML page that streams from /stream, "
                                                            "/v1/chat/completions and /stream_chat_beam.", (
    Media("text/html", schema={"type": "string"}),))})
def index():
    """A page to try the service in a browser; its scripts and styles are served from /static (no CDN)."""
    return send_from_directory(STATIC_DIR, "index.html", max_age=0)
