"""`GET /`: the demo page and its scripts come from this server (no CDN), with every control it needs."""

from __future__ import annotations

import re

PAGE_IDS = ["prompt", "send", "stop", "output", "max-tokens", "temperature", "backend", "beam-width", "ttft", "tps",
            "history", "candidates", "new-chat"]


def test_the_demo_page_has_its_controls(client):
    page = client.get("/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    for element_id in PAGE_IDS:
        assert f'id="{element_id}"' in html, element_id
    assert 'value="prompt"' in html and 'value="chat"' in html


def test_the_page_s_assets_are_served_locally(client):
    html = client.get("/").get_data(as_text=True)
    assets = [a for a in re.findall(r'(?:src|href)="([^"]+)"', html) if a.startswith("/static/")]
    assert sorted(assets) == ["/static/demo.css", "/static/demo.js"]
    for asset in assets:
        response = client.get(asset)
        assert response.status_code == 200
        assert not re.search(r"https?://", response.get_data(as_text=True)), f"{asset} loads something from outside"


def test_the_script_uses_the_routes_it_promises(client):
    script = client.get("/static/demo.js").get_data(as_text=True)
    for route in ('"/stream"', '"/v1/chat/completions"', '"/stream_chat_beam"', "`/jobs/${run.jobId}`", "X-Job-Id"):
        assert route in script, route
    assert "AbortController" in script and 'method: "DELETE"' in script
