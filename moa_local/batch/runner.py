"""The batch job: a JSONL file of conversations through a loaded recipe, streamed, resumable, with a summary.

``prepare_batch`` runs before any engine loads: it checks the paths (output and trace writable, not the input,
an existing output a results file of this tool), validates every input line, and reads the ids already in the
output. ``run_batch`` then streams: the input is read again as the scheduler's window frees up, ids already
answered are skipped, and each conversation's record is appended the moment it finishes (fsynced after each burst).
Under the flow schedule nothing else is kept; under the stage schedule (phased plans) every finished response also
goes to a journal beside the output (``OUTPUT.journal``, SQLite), deleted when the job completes unless asked to
keep it. Killed at any moment (kill -9 included), the same command resumes: every id ends up in the output
exactly once, and no response in the journal is generated again. Progress goes to a callback; this module never
prints.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moa_local.api import MoA
from moa_local.batch.index import IdIndex
from moa_local.batch.jsonl import (
    ResultWriter,
    check_writable,
    iter_input,
    scan_output,
    validate_input,
)
from moa_local.pipeline import Conversation, FlowScheduler, Result, StageScheduler
from moa_local.pipeline.journal import Journal
from moa_local.pipeline.scheduler import runner_phases

Progress = Callable[[int, int], None]
"""(conversations done, including skipped ones; total)."""


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


def journal_path(output: Path) -> Path:
    return output.with_name(output.name + ".journal")


@dataclass
class BatchJob:
    """A checked job, ready to run: its input (validated), output, and the ids the output already holds."""

    input: Path
    output: Path
    total: int
    done: IdIndex

    def close(self) -> None:
        self.done.close()


def prepare_batch(input: Path, output: Path) -> BatchJob:
    """Everything that can be checked before engines load (see the module doc). Raises InputError."""
    check_writable(output, what="--output", avoid=input)
    check_writable(journal_path(output), what="the job journal")
    total = validate_input(input)
    done = IdIndex()
    try:
        scan_output(output, done)
    except BaseException:
        done.close()
        raise
    return BatchJob(input=input, output=output, total=total, done=done)


@dataclass
class BatchSummary:
    """What a batch job did. ``engine_starts`` and ``swaps``: the process's engines, the first load included."""

    total: int
    skipped: int = 0
    ok: int = 0
    failed: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    wall_s: float = 0.0
    engine_starts: int = 0
    swaps: int = 0
    schedule: str = "flow"
    window: int = 0
    journal: str | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)
    forecast_wall_s: float | None = None
    """The forecast of ``wall_s`` made before the job started (batch/forecast.py); None when none could be made."""

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["wall_s"] = round(self.wall_s, 3)
        data["tokens_per_s"] = round(self.tokens_per_s, 2)
        if self.forecast_wall_s is not None:
            data["forecast_wall_s"] = round(self.forecast_wall_s, 1)
        return data

    def line(self) -> str:
        """One line for people; with a forecast, the wall time against it: ``(45.5 tok/s; forecast 610 s, -9%)``."""
        versus = ""
        if self.forecast_wall_s is not None and self.forecast_wall_s > 0:
            f = self.forecast_wall_s
            versus = f"; forecast {f:.0f} s, {100 * (self.wall_s - f) / f:+.0f}%"
        return (f"{self.ok} ok, {self.failed} failed, {self.skipped} skipped; {self.generated_tokens} tokens generated "
                f"in {self.wall_s:.1f} s ({self.tokens_per_s:.1f} tok/s{versus}); {self.engine_starts} engine starts, "
                f"{self.swaps} swaps ({self.schedule} schedule)")


def _engine_counts(moa: MoA) -> tuple[int, int]:
    stats = getattr(moa.runner, "stats", None)
    if stats is None:
        return 0, 0
    return sum(stats.starts.values()), int(stats.swaps)


def run_batch(moa: MoA, job: BatchJob, *, trace: bool = False, keep_journal: bool = False,
              on_progress: Progress | None = None, on_step: Callable[[str, int], None] | None = None) -> BatchSummary:
    """Run every record of ``job`` not yet in its output (see the module doc). Returns the summary."""
    pipeline = moa.pipeline
    summary = BatchSummary(total=job.total, skipped=len(job.done), schedule=pipeline.schedule, window=pipeline.window)
    began = time.perf_counter()

    def source() -> Iterator[Conversation]:
        for record in iter_input(job.input):
            if record.id not in job.done:
                yield Conversation(record.id, record.messages)

    with ResultWriter(job.output, group=True) as writer:

        def on_result(result: Result) -> None:
            writer.write(result_record(result, recipe=moa.recipe.name, trace=trace))
            if result.ok:
                summary.ok += 1
            else:
                summary.failed += 1
            usage = result.usage
            summary.generated_tokens += usage.completion_tokens
            summary.prompt_tokens += usage.prompt_tokens
            if on_progress is not None:
                on_progress(summary.skipped + summary.ok + summary.failed, job.total)

        if on_progress is not None:
            on_progress(summary.skipped, job.total)
        if pipeline.schedule == "flow":
            FlowScheduler(moa.recipe, moa.runner, window=pipeline.window).run(source(), on_result,
                                                                               commit=writer.sync)
        else:
            phase_of, resident, _ = runner_phases(moa.runner)
            stage = StageScheduler(moa.recipe, moa.runner, window=pipeline.stage_window(), phase_of=phase_of,
                                   start_phase=resident)
            path = journal_path(job.output)
            journal = Journal(path, shape=stage.shape())
            summary.journal = str(path)
            complete = False
            try:
                stage.run(source, on_result, journal=journal, progress=on_step)
                complete = True
            finally:
                writer.sync()
                journal.close(delete=complete and not keep_journal)
            if complete and not keep_journal:
                summary.journal = None
            summary.steps = stage.step_log
    summary.wall_s = time.perf_counter() - began
    summary.engine_starts, summary.swaps = _engine_counts(moa)
    return summary
