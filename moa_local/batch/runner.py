"""The batch runner: skips finished ids, feeds the pipeline in chunks, writes each finished record at once.

Chunks bound the work a kill can lose (at most one chunk in flight) while each chunk is still one batch per layer.
Progress (rate, ETA) goes to stderr through a callback; this module never prints.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from moa_local.api import MoA
from moa_local.batch.jsonl import InputRecord, ResultWriter, finished_ids
from moa_local.pipeline import Conversation, Progress, Result


def result_record(result: Result, *, recipe: str, trace: bool) -> dict[str, Any]:
    record: dict[str, Any] = {
        "id": result.id,
        "output": result.output,
        "recipe": recipe,
        "error": result.error,
        "usage": result.usage.to_dict(),
        "seconds": round(result.seconds, 4),
    }
    if trace:
        record["trace"] = result.trace()
    return record


def run_batch(
    moa: MoA,
    records: list[InputRecord],
    output: Path,
    *,
    chunk_size: int = 64,
    trace: bool = False,
    on_records: Callable[[int, int], None] | None = None,
    progress: Progress | None = None,
) -> dict[str, int]:
    """Run every record not yet in ``output``. ``on_records(done, total)`` after each chunk.
    Returns counts: total, skipped, ok, failed."""
    done_ids = finished_ids(output)
    todo = [r for r in records if r.id not in done_ids]
    counts = {"total": len(records), "skipped": len(records) - len(todo), "ok": 0, "failed": 0}
    if on_records:
        on_records(counts["skipped"], len(records))
    with ResultWriter(output) as writer:
        for start in range(0, len(todo), chunk_size):
            chunk = todo[start : start + chunk_size]
            results = moa.pipeline.run([Conversation(id=r.id, messages=r.messages) for r in chunk], progress=progress)
            for result in results:
                writer.write(result_record(result, recipe=moa.recipe.name, trace=trace))
                counts["ok" if result.ok else "failed"] += 1
            if on_records:
                on_records(counts["skipped"] + counts["ok"] + counts["failed"], len(records))
    return counts
