"""The trace viewer (`moa-local view`): a batch output with traces, a `--trace` file or an eval folder, turned into
one self-contained HTML file that opens from disk (search, layers side by side, agreement between proposers,
tokens and seconds per role, failures, and for an eval folder where MoA won or lost against the best single system).

    sources.py     read the three formats (read-only) into conversations with traces
    similarity.py  the word-level similarity the page states
    payload.py     the compact JSON the page embeds
    html.py        template + CSS + script + data -> one file
    static/        report.html, report.css, report.js (no build step)

Never runs a model and never touches the network; the page it writes fetches nothing either.
"""

from __future__ import annotations

from pathlib import Path

from moa_local.errors import InputError
from moa_local.view.html import render_report
from moa_local.view.payload import build_payload
from moa_local.view.sources import read_source


def write_report(path: Path, output: Path | None = None, *, input: Path | None = None) -> Path:
    """Write the report of ``path`` to ``output`` (default: report.html inside an eval folder, else next to the
    file, named after it). ``input`` is a batch job's input, for its prompts. Returns the file written."""
    if output is None:
        output = path / "report.html" if path.is_dir() else path.with_suffix(".html")
    if output.resolve() in (path.resolve(), input.resolve() if input else None):
        raise InputError(f"writing the report to {output} would overwrite its input; choose another -o")
    source = read_source(path, input=input)
    title = f"moa-local view · {path.name or path}"
    output.write_text(render_report(build_payload(source), title=title), encoding="utf-8")
    return output


__all__ = ["write_report"]
