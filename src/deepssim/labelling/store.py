"""Labels in SQLite: every click is one committed row, so a crash or a closed tab loses nothing.

``labels.sqlite`` in the labels folder holds the queue (drawn once, the same for every rater),
and an append-only table of events (rater, position, label, time). Undo marks a rater's last
event undone; a rater's label of a pair is their latest event that is not undone. Several
processes may write to one folder at once (WAL journal, one transaction per click).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from deepssim.errors import DeepSSIMError
from deepssim.labelling.queue import QueuedPair
from deepssim.labels import Label

LABELS = Label.titles()  # what a rater may click, in the order of the buttons
SKIP = "skip"
DATABASE = "labels.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS queue (
    position INTEGER PRIMARY KEY,
    train_key TEXT NOT NULL,
    generated_key TEXT NOT NULL,
    score REAL NOT NULL,
    transform TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    rater TEXT NOT NULL,
    position INTEGER NOT NULL REFERENCES queue(position),
    label TEXT NOT NULL CHECK (label IN ('Different', 'Similar', 'Duplicate', 'skip')),
    time_utc TEXT NOT NULL,
    undone INTEGER NOT NULL DEFAULT 0
);
"""

_CURRENT = """
SELECT e.rater, e.position, e.label FROM events e
JOIN (SELECT MAX(id) AS id FROM events WHERE undone = 0 GROUP BY rater, position) latest
ON e.id = latest.id
"""


class LabelStore:
    """One labels folder. Open it with :meth:`create` (first rater) or :meth:`open`."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / DATABASE

    @classmethod
    def create(cls, folder: str | Path, pairs: list[QueuedPair], meta: dict) -> LabelStore:
        """The folder's store, with ``pairs`` as its queue unless it already has one.

        A folder drawn from another scan is refused, so labels of two scans never mix.
        """
        store = cls(folder)
        store.folder.mkdir(parents=True, exist_ok=True)
        with store._connect() as connection:
            connection.executescript(_SCHEMA)
            existing = dict(connection.execute("SELECT key, value FROM meta"))
            if existing:
                if json.loads(existing["scan"]) != meta["scan"]:
                    raise DeepSSIMError(
                        f"{store.folder} holds labels of the scan {json.loads(existing['scan'])}; "
                        "choose another --out for this scan"
                    )
                return store
            connection.executemany(
                "INSERT INTO queue VALUES (?, ?, ?, ?, ?)",
                [(n, p.train_key, p.generated_key, p.score, p.transform) for n, p in enumerate(pairs)],
            )
            connection.executemany(
                "INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()]
            )
        return store

    @classmethod
    def open(cls, folder: str | Path) -> LabelStore:
        store = cls(folder)
        if not store.path.is_file():
            raise DeepSSIMError(f"{folder}: no {DATABASE} here; start labelling with deepssim label --scan")
        return store

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        connection = sqlite3.connect(self.path, timeout=30)
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA foreign_keys=ON")
            with connection:  # one transaction: committed whole or rolled back
                yield connection
        except sqlite3.DatabaseError as error:
            raise DeepSSIMError(f"{self.path}: {error}") from None
        finally:
            connection.close()

    def meta(self) -> dict:
        with self._connect() as connection:
            return {k: json.loads(v) for k, v in connection.execute("SELECT key, value FROM meta")}

    def queue(self) -> list[QueuedPair]:
        with self._connect() as connection:
            rows = connection.execute(
                "SELECT train_key, generated_key, score, transform FROM queue ORDER BY position"
            ).fetchall()
        return [QueuedPair(*row) for row in rows]

    def record(self, rater: str, position: int, label: str) -> None:
        if label not in (*LABELS, SKIP):
            raise DeepSSIMError(f"label must be one of {', '.join(LABELS)} or {SKIP}, not {label!r}")
        time = datetime.now(UTC).isoformat(timespec="milliseconds")
        with self._connect() as connection:
            connection.execute(
                "INSERT INTO events (rater, position, label, time_utc) VALUES (?, ?, ?, ?)",
                (rater, position, label, time),
            )

    def undo(self, rater: str) -> int | None:
        """Undo the rater's last event; returns its position (None when there is nothing to undo)."""
        with self._connect() as connection:
            row = connection.execute(
                "SELECT id, position FROM events WHERE rater = ? AND undone = 0 ORDER BY id DESC LIMIT 1",
                (rater,),
            ).fetchone()
            if row is None:
                return None
            connection.execute("UPDATE events SET undone = 1 WHERE id = ?", (row[0],))
        return row[1]

    def current(self) -> dict[tuple[str, int], str]:
        """(rater, position) -> that rater's current label of that pair (skips included)."""
        with self._connect() as connection:
            return {(rater, position): label for rater, position, label in connection.execute(_CURRENT)}

    def progress(self, rater: str) -> tuple[int | None, int, int]:
        """(the rater's next unlabelled position or None when done, positions done, queue length)."""
        with self._connect() as connection:
            total = connection.execute("SELECT COUNT(*) FROM queue").fetchone()[0]
            done = {p for r, p, _ in connection.execute(_CURRENT) if r == rater}
        following = next((p for p in range(total) if p not in done), None)
        return following, len(done), total

    def events(self) -> list[tuple]:
        """Every event, undone ones too: (id, rater, position, label, time_utc, undone)."""
        with self._connect() as connection:
            return connection.execute("SELECT * FROM events ORDER BY id").fetchall()
