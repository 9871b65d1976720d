"""The journal of a stage-major job: every finished response, durable, so a killed job resumes without regenerating
any of them. SQLite in WAL mode (the embedded default, no server), one file beside the batch output (or in memory
for a job that lives in one process, like ``MoA.run``).

Rows: (conversation id, layer, role) -> the Response as JSON (the aggregator is layer ``layers + 1``); a
conversation that ended (answered or failed) is marked finished once its result was handed on. ``meta`` holds the
recipe's shape, and a journal of another shape is refused. Each ``put`` is its own transaction (WAL,
synchronous=NORMAL): once it returns, a kill -9 of the process cannot lose it. Knows nothing about engines.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

from moa_local.engines.base import Usage
from moa_local.errors import InputError
from moa_local.pipeline.trace import Response, Trimmed


def response_from_dict(data: dict[str, Any]) -> Response:
    return Response(role=data["role"], model=data["model"], text=data["text"], error=data["error"],
                    usage=Usage(**data["usage"]), seconds=data["seconds"], attempts=data["attempts"],
                    kind=data.get("kind"), trimmed=Trimmed(**data["trimmed"]) if data.get("trimmed") else None)


class Journal:
    """Finished responses of one job. ``path`` None: in memory."""

    def __init__(self, path: Path | None, *, shape: dict[str, Any]) -> None:
        self.path = path
        target = ":memory:" if path is None else str(path)
        try:
            self._db = sqlite3.connect(target, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(
                "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
                "CREATE TABLE IF NOT EXISTS responses (conv TEXT NOT NULL, layer INTEGER NOT NULL, role TEXT NOT NULL,"
                " data TEXT NOT NULL, PRIMARY KEY (conv, layer, role));"
                "CREATE TABLE IF NOT EXISTS finished (conv TEXT PRIMARY KEY);"
            )
        except sqlite3.Error as exc:
            raise InputError(f"cannot open the job journal {target}: {exc}. Move it away or check the folder.") from None
        self._lock = threading.Lock()
        wanted = json.dumps(shape, sort_keys=True)
        row = self._db.execute("SELECT value FROM meta WHERE key = 'shape'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('shape', ?)", (wanted,))
        elif row[0] != wanted:
            raise InputError(
                f"the job journal {path} belongs to another recipe or schedule ({row[0]}); this run is {wanted}. "
                "Rerun with the same recipe, or delete the journal to start its unfinished conversations over."
            )

    def put(self, conv: str, layer: int, response: Response) -> None:
        data = json.dumps(response.to_dict(), ensure_ascii=False)
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?)", (conv, layer, response.role, data))

    def layers(self, conv: str) -> dict[int, dict[str, Response]]:
        """Layer -> role -> Response, for one conversation."""
        with self._lock:
            rows = self._db.execute("SELECT layer, role, data FROM responses WHERE conv = ?", (conv,)).fetchall()
        out: dict[int, dict[str, Response]] = {}
        for layer, role, data in rows:
            out.setdefault(layer, {})[role] = response_from_dict(json.loads(data))
        return out

    def finish(self, conv: str) -> None:
        """Mark ``conv`` ended (its result was handed on); its responses are no longer needed."""
        with self._lock:
            self._db.execute("BEGIN")
            self._db.execute("INSERT OR IGNORE INTO finished VALUES (?)", (conv,))
            self._db.execute("DELETE FROM responses WHERE conv = ?", (conv,))
            self._db.execute("COMMIT")

    def is_finished(self, conv: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM finished WHERE conv = ?", (conv,)).fetchone() is not None

    def counts(self) -> dict[str, int]:
        with self._lock:
            responses = self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
            finished = self._db.execute("SELECT COUNT(*) FROM finished").fetchone()[0]
        return {"responses": int(responses), "finished": int(finished)}

    def close(self, *, delete: bool = False) -> None:
        """Close; ``delete`` removes the file and its WAL (the job completed)."""
        with self._lock:
            self._db.close()
        if delete and self.path is not None:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
