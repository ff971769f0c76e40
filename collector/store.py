"""The collector's database: SQLite, one schema, numbered migrations, idempotent writes.

Every write is keyed so that a QoS 1 redelivery (the same ``message_id`` again) changes nothing, and
a batch is one transaction: the caller acknowledges the broker only after ``write`` returns, so a
crash loses no message (the broker sends it again). Sequence gaps are computed from what is stored,
so a result that arrives late (after a reconnect) closes its gap instead of leaving a false alarm.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from collector.messages import DeadLetter, Message
from edge.errors import UserError

#: Each entry migrates the schema from version i to i + 1; only ever append.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE frame_results (
        message_id TEXT PRIMARY KEY,
        device_id TEXT NOT NULL,
        run_id TEXT NOT NULL,
        sequence INTEGER NOT NULL,
        sample_id TEXT,
        time TEXT NOT NULL,
        cells INTEGER NOT NULL,
        blasts INTEGER NOT NULL,
        unclassified INTEGER NOT NULL,
        received_at REAL NOT NULL,
        json TEXT NOT NULL
    );
    CREATE INDEX frame_results_device_sequence ON frame_results (device_id, sequence);
    CREATE INDEX frame_results_sample ON frame_results (sample_id, time);
    CREATE TABLE sample_summaries (
        device_id TEXT NOT NULL,
        sample_id TEXT NOT NULL,
        message_id TEXT NOT NULL,
        run_id TEXT NOT NULL,
        started TEXT NOT NULL,
        frames INTEGER NOT NULL,
        final INTEGER NOT NULL,
        received_at REAL NOT NULL,
        json TEXT NOT NULL,
        PRIMARY KEY (device_id, sample_id)
    );
    CREATE TABLE device_status (
        device_id TEXT PRIMARY KEY,
        status TEXT NOT NULL,
        received_at REAL NOT NULL
    );
    CREATE TABLE device_stats (
        id INTEGER PRIMARY KEY,
        device_id TEXT NOT NULL,
        run_id TEXT,
        received_at REAL NOT NULL,
        json TEXT NOT NULL
    );
    CREATE INDEX device_stats_device ON device_stats (device_id, received_at);
    CREATE TABLE dead_letters (
        id INTEGER PRIMARY KEY,
        topic TEXT NOT NULL,
        reason TEXT NOT NULL,
        payload BLOB NOT NULL,
        received_at REAL NOT NULL
    );
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


@dataclass(frozen=True)
class Gap:
    """Sequence numbers ``first``..``last`` of ``device_id`` that never arrived."""

    device_id: str
    first: int
    last: int

    @property
    def missing(self) -> int:
        return self.last - self.first + 1


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
        except (OSError, sqlite3.Error) as error:
            raise UserError(f"database {path} cannot be opened ({error}); check database.path and its folder's permissions") from None
        # FULL: a commit is on disk before the broker is acknowledged, so not even a power cut loses a result.
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA busy_timeout=5000")
        self._migrate()

    def _migrate(self) -> None:
        db = self.db
        db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = db.execute("SELECT version FROM schema_version").fetchone()
        current = row[0] if row else 0
        if current > SCHEMA_VERSION:
            raise UserError(f"database {self.path} has schema version {current}, newer than this collector's "
                            f"{SCHEMA_VERSION}; upgrade leukoscope")
        for version in range(current, SCHEMA_VERSION):
            db.execute("BEGIN IMMEDIATE")
            try:
                for statement in MIGRATIONS[version].split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute("DELETE FROM schema_version")
                db.execute("INSERT INTO schema_version (version) VALUES (?)", (version + 1,))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def schema_version(self) -> int:
        return self.db.execute("SELECT version FROM schema_version").fetchone()[0]

    def write(self, items: Iterable[Message | DeadLetter]) -> int:
        """Store a batch in one transaction; returns the rows that were new (repeats are ignored)."""
        now = time.time()
        added = 0
        db = self.db
        db.execute("BEGIN")
        try:
            for item in items:
                added += self._write_one(item, now)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return added

    def _write_one(self, item: Message | DeadLetter, now: float) -> int:
        db = self.db
        if isinstance(item, DeadLetter):
            db.execute("INSERT INTO dead_letters (topic, reason, payload, received_at) VALUES (?, ?, ?, ?)",
                       (item.topic, item.reason, item.raw, now))
            return 1
        body = item.body
        if item.kind == "results":
            counts = body["counts"]
            return db.execute(
                "INSERT INTO frame_results (message_id, device_id, run_id, sequence, sample_id, time, cells, blasts,"
                " unclassified, received_at, json) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (message_id) DO NOTHING",
                (body["message_id"], item.device_id, body["run_id"], body["sequence"], body["sample_id"], body["time"],
                 counts["cells"], counts["blasts"], counts["unclassified"], now, item.raw.decode())).rowcount
        if item.kind == "samples":
            sample = body["sample_id"] if body["sample_id"] is not None else item.topic.rsplit("/", 1)[-1]
            # Retained summaries may come back out of order (a redelivery after a newer one): keep the
            # latest tally, judged by its start and its frame count, never the last to arrive.
            return db.execute(
                "INSERT INTO sample_summaries (device_id, sample_id, message_id, run_id, started, frames, final, received_at, json)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (device_id, sample_id) DO UPDATE SET"
                " message_id = excluded.message_id, run_id = excluded.run_id, started = excluded.started,"
                " frames = excluded.frames, final = excluded.final, received_at = excluded.received_at, json = excluded.json"
                " WHERE (excluded.started, excluded.frames, excluded.final) > (started, frames, final)",
                (item.device_id, sample, body["message_id"], body["run_id"], body["started"], body["frames"],
                 int(body["final"]), now, item.raw.decode())).rowcount
        if item.kind == "status":
            db.execute("INSERT INTO device_status (device_id, status, received_at) VALUES (?, ?, ?) ON CONFLICT (device_id)"
                       " DO UPDATE SET status = excluded.status, received_at = excluded.received_at", (item.device_id, body, now))
            return 1
        db.execute("INSERT INTO device_stats (device_id, run_id, received_at, json) VALUES (?, ?, ?, ?)",
                   (item.device_id, body.get("run_id"), now, item.raw.decode()))
        return 1

    # -- reading ------------------------------------------------------------------------------
    def gaps(self, device_id: str | None = None) -> list[Gap]:
        """Runs of sequence numbers missing between the first and the last a device's results carried."""
        rows = self.db.execute(
            "SELECT device_id, sequence, next FROM (SELECT device_id, sequence, LEAD(sequence) OVER"
            " (PARTITION BY device_id ORDER BY sequence) AS next FROM (SELECT DISTINCT device_id, sequence FROM frame_results"
            " WHERE ?1 IS NULL OR device_id = ?1)) WHERE next > sequence + 1 ORDER BY device_id, sequence", (device_id,))
        return [Gap(device, sequence + 1, following - 1) for device, sequence, following in rows]

    def sequence_ranges(self, device_id: str | None = None) -> list[tuple[str, int, int, int, int]]:
        """Per device: (device_id, results stored, first and last sequence, sequences carried by more than one message_id)."""
        return self.db.execute(
            "SELECT device_id, COUNT(*), MIN(sequence), MAX(sequence), COUNT(*) - COUNT(DISTINCT sequence) FROM frame_results"
            " WHERE ?1 IS NULL OR device_id = ?1 GROUP BY device_id ORDER BY device_id", (device_id,)).fetchall()

    def dead_letters(self, limit: int = 50) -> list[tuple[float, str, str, bytes]]:
        return self.db.execute("SELECT received_at, topic, reason, payload FROM dead_letters ORDER BY id DESC LIMIT ?",
                               (limit,)).fetchall()

    def frames_of(self, sample_id: str) -> list[dict]:
        return [json.loads(text) for (text,) in self.db.execute(
            "SELECT json FROM frame_results WHERE sample_id = ? ORDER BY time, device_id, sequence", (sample_id,))]

    def summaries_of(self, sample_id: str) -> list[dict]:
        return [json.loads(text) for (text,) in self.db.execute(
            "SELECT json FROM sample_summaries WHERE sample_id = ? ORDER BY device_id", (sample_id,))]

    def latest_stats(self, device_id: str) -> dict | None:
        row = self.db.execute("SELECT json FROM device_stats WHERE device_id = ? ORDER BY id DESC LIMIT 1", (device_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def close(self) -> None:
        self.db.close()
