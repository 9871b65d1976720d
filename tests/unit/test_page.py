"""The chat page's routes (server/page.py), without a browser: the page, its two assets, nothing else, and headers
that keep it from loading anything from elsewhere."""

from __future__ import annotations

import re

from fastapi import FastAPI
from fastapi.testclient import TestClient

from moa_local.server.page import ASSETS, CSP, mount_page


def client() -> TestClient:
    app = FastAPI()
    mount_page(app)
    return TestClient(app)


def test_the_page_and_its_assets_are_served_with_a_strict_policy() -> None:
    c = client()
    page = c.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == CSP and "connect-src 'self'" in CSP
    # Every asset the page names is served, with its type; nothing it names is off-site.
    named = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sorted(n for n in named if n.startswith("static/")) == ["static/chat.css", "static/chat.js"]
    assert all(n.startswith("static/") or n.startswith("data:") for n in named)
    for name, kind in ASSETS.items():
        r = c.get(f"/static/{name}")
        assert r.status_code == 200 and r.headers["content-type"] == kind and len(r.content) > 500


def test_only_the_listed_files_are_served() -> None:
    c = client()
    for path in ("/static/page.py", "/static/..%2Fpage.py", "/static/chat.html", "/static/%2e%2e/openai.py"):
        assert c.get(path).status_code == 404, path


def test_the_script_talks_only_to_this_server_with_the_documented_request() -> None:
    script = (c := client()).get("/static/chat.js").text
    assert '"v1/chat/completions"' in script and '"v1/models"' in script  # relative: works under a path prefix
    assert "stream: true, moa_events: true" in script
    assert "sessionStorage" in script and "localStorage" not in script  # the key lives for the tab only
    assert "innerHTML" not in script  # model text never parsed as HTML
    assert not re.search(r"https?://", script) and c.get("/").status_code == 200
