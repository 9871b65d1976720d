"""One self-contained HTML file: the page template, its CSS and script (package data in static/) and the payload,
all inlined. The page fetches nothing: its Content-Security-Policy forbids every network request.

Knows the template's placeholders and how to embed JSON safely in a <script> element; nothing about traces.
"""

from __future__ import annotations

import html
import json
import re
from functools import cache
from importlib import resources
from typing import Any

_SLOT = re.compile(r"\{\{(\w+)\}\}")


@cache
def static_text(name: str) -> str:
    """A file of moa_local/view/static (the page's template, CSS and script)."""
    return resources.files("moa_local.view").joinpath("static", name).read_text(encoding="utf-8")


def embed_json(data: Any) -> str:
    """JSON that is safe inside <script type="application/json">: no '<' can close the element early."""
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")


def render_report(payload: dict[str, Any], *, title: str) -> str:
    """The whole page. Placeholders are filled in one pass, so text in the data can never fill another slot."""
    slots = {"title": html.escape(title), "style": static_text("report.css"), "script": static_text("report.js"),
             "data": embed_json(payload)}
    return _SLOT.sub(lambda m: slots[m.group(1)], static_text("report.html"))
