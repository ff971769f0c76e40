"""The durable outbox: every message is on disk before it is published, and leaves only when acknowledged.

SQLite in WAL mode with ``synchronous=FULL``: a committed row survives SIGKILL and power loss.
Rows are sent oldest first; the publisher deletes a row only when the broker has acknowledged
it (PUBACK for QoS 1). The outbox is bounded: when full, the configured policy drops the oldest
(or refuses the newest) and the dropped count is kept on disk and reported in ``stats``.

The outbox is also the one home of the device's result ``sequence``: a counter on disk, taken in the
same transaction that stores the row, so numbers continue across restarts and a crash can neither
skip one nor hand one out twice.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edge.errors import UserError

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL DEFAULT 1,
    retain INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class Message:
    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool


class Outbox:
    def __init__(self, path: Path, *, max_messages: int = 500_000, when_full: str = "drop_oldest") -> None:
        self.path = Path(path)
        self.max_messages = max_messages
        self.when_full = when_full
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
            self._count = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        except (sqlite3.Error, OSError) as error:
            raise UserError(f"outbox {self.path} cannot be opened ({error}); check outbox.path and that the "
                            "directory is writable (StateDirectory= in the unit)") from None

    def put(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int | None:
        """Store a message durably; returns its id (None if it was refused because the outbox is full)."""
        return self._put(topic, lambda: payload, qos, retain)

    def put_numbered(self, topic: str, render: Callable[[int], bytes], *, qos: int = 1, retain: bool = False) -> int | None:
        """Store ``render(n)``, n being the next number of the persistent sequence (1, 2, ... for the life of the file).

        A message refused or dropped because the outbox is full keeps its number: the gap is what a
        subscriber sees of it (``stats`` counts it). If ``render`` raises, nothing is stored or used up.
        """
        return self._put(topic, lambda: render(self._bump("sequence", 1)), qos, retain)

    def _put(self, topic: str, payload: Callable[[], bytes], qos: int, retain: bool) -> int | None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                body = payload()
                if self._count >= self.max_messages:
                    if self.when_full == "drop_newest":
                        self._bump("dropped", 1)
                        self._db.execute("COMMIT")
                        return None
                    excess = self._count - self.max_messages + 1
                    self._db.execute("DELETE FROM outbox WHERE id IN (SELECT id FROM outbox ORDER BY id LIMIT ?)", (excess,))
                    self._count -= excess
                    self._bump("dropped", excess)
                cursor = self._db.execute("INSERT INTO outbox (topic, payload, qos, retain) VALUES (?, ?, ?, ?)",
                                          (topic, body, qos, int(retain)))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._count += 1
            return int(cursor.lastrowid)

    def _bump(self, name: str, by: int) -> int:
        """Add to a counter inside the caller's transaction; returns its new value."""
        self._db.execute("INSERT INTO counters (name, value) VALUES (?, ?) "
                         "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value", (name, by))
        return int(self._db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()[0])

    def pending(self, limit: int = 100, after: int = 0) -> list[Message]:
        """Oldest first, with ids greater than ``after``."""
        with self._lock:
            rows = self._db.execute("SELECT id, topic, payload, qos, retain FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                                    (after, limit)).fetchall()
        return [Message(int(r[0]), r[1], bytes(r[2]), int(r[3]), bool(r[4])) for r in rows]

    def ack(self, message_ids: list[int]) -> None:
        """Remove acknowledged messages, in one transaction (one fsync for a whole batch of PUBACKs)."""
        if not message_ids:
            return
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            deleted = self._db.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in message_ids]).rowcount
            self._db.execute("COMMIT")
            self._count -= deleted

    def __len__(self) -> int:
        return self._count

    def count(self, topic: str) -> int:
        """Messages waiting on ``topic`` (e.g. the device's results), to say what is left."""
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM outbox WHERE topic = ?", (topic,)).fetchone()[0])

    def _counter(self, name: str) -> int:
        with self._lock:
            row = self._db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    @property
    def dropped(self) -> int:
        return self._counter("dropped")

    @property
    def sequence(self) -> int:
        """The last number ``put_numbered`` gave out (0 before the first)."""
        return self._counter("sequence")

    def close(self) -> None:
        with self._lock:
            self._db.close()
