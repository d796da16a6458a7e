"""The resume ledger: which items are committed, with what result.

An item is committed when its outputs are durable (written by its stage with
:meth:`StageContext.output_dir`) *and* its result is in this ledger.  A resumed
run skips an item whose key is here with the same fingerprint (same config,
same value, same input files by size and mtime) and whose declared outputs
exist, and replays its stored result instead of recomputing it.

SQLite does the hard part: an interrupted transaction is rolled back on the next
open, so a SIGKILL at any moment leaves the ledger as of its last commit.  Only
the writer process writes it; the producer reads it through its own connection
(connections must not cross a fork).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    key TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    value BLOB NOT NULL
)
"""


@dataclass(frozen=True, slots=True)
class Entry:
    key: str
    fingerprint: str
    value: bytes


class Ledger:
    def __init__(self, path: Path, *, fsync: bool = True, readonly: bool = False) -> None:
        self.path = path
        if readonly:
            self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk before the writer acknowledges it.
            self._db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'OFF'}")
            self._db.execute(SCHEMA)
            self._db.commit()

    def lookup(self, key: str) -> Entry | None:
        row = self._db.execute(
            "SELECT key, fingerprint, value FROM items WHERE key = ?", (key,)
        ).fetchone()
        return Entry(row[0], row[1], row[2]) if row else None

    def commit(self, entries: Iterable[Entry]) -> None:
        with self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO items (key, fingerprint, value) VALUES (?, ?, ?)",
                [(e.key, e.fingerprint, e.value) for e in entries],
            )

    def count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM items").fetchone()[0])

    def close(self) -> None:
        self._db.close()


def open_for_reading(path: Path) -> Ledger | None:
    if not path.exists():
        return None
    try:
        return Ledger(path, readonly=True)
    except sqlite3.Error:
        return None
