"""A set of conversation ids that stays small in memory however large the job: an SQLite table in a temporary file
(the page cache, ~2 MiB, is all it holds in RAM). The batch job keeps two: the input's ids (duplicates are an error)
and the ids already in the output (skipped on resume). Exact, no hashing. Knows nothing about JSONL or engines.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import tempfile
from collections.abc import Iterator


class IdIndex:
    """Ids with the line they came from. ``add`` returns the earlier line of an id already present."""

    def __init__(self) -> None:
        fd, self._path = tempfile.mkstemp(prefix="moa-ids-", suffix=".sqlite")
        os.close(fd)
        self._db = sqlite3.connect(self._path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute("CREATE TABLE ids (id TEXT PRIMARY KEY, line INTEGER NOT NULL) WITHOUT ROWID")
        self._db.execute("BEGIN")
        self._pending = 0
        self.count = 0

    def add(self, key: str, line: int) -> int | None:
        """Insert ``key`` (seen on ``line``); the line it was first seen on when it is already present."""
        try:
            self._db.execute("INSERT INTO ids VALUES (?, ?)", (key, line))
        except sqlite3.IntegrityError:
            row = self._db.execute("SELECT line FROM ids WHERE id = ?", (key,)).fetchone()
            return int(row[0])
        self.count += 1
        self._pending += 1
        if self._pending >= 50_000:  # keep the transaction (and its memory) bounded
            self._db.execute("COMMIT")
            self._db.execute("BEGIN")
            self._pending = 0
        return None

    def keys(self) -> Iterator[str]:
        for (key,) in self._db.execute("SELECT id FROM ids"):
            yield key

    def __contains__(self, key: object) -> bool:
        return self._db.execute("SELECT 1 FROM ids WHERE id = ?", (key,)).fetchone() is not None

    def __len__(self) -> int:
        return self.count

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.close()
        with contextlib.suppress(OSError):
            os.remove(self._path)

    def __enter__(self) -> IdIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
