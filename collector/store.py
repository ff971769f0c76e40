"""The collector's database: SQLite or PostgreSQL, one schema, numbered migrations, idempotent writes.

SQLite (embedded, nothing to set up) is the default; a lab network points ``database.url`` at a
PostgreSQL server instead. Both run the same migrations and the same statements: the schema is written
once with a few words that differ (``{id}``, ``{real}``, ``{blob}``, ``{stored_order}``), and statements use ``?``
placeholders, turned into psycopg's ``%s`` for PostgreSQL.

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
from typing import Any, Iterable

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
        received_at {real} NOT NULL,
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
        received_at {real} NOT NULL,
        json TEXT NOT NULL,
        PRIMARY KEY (device_id, sample_id)
    );
    CREATE TABLE device_status (
        device_id TEXT PRIMARY KEY,
        status TEXT NOT NULL,
        received_at {real} NOT NULL
    );
    CREATE TABLE device_stats (
        id {id},
        device_id TEXT NOT NULL,
        run_id TEXT,
        received_at {real} NOT NULL,
        json TEXT NOT NULL
    );
    CREATE INDEX device_stats_device ON device_stats (device_id, received_at);
    CREATE TABLE dead_letters (
        id {id},
        topic TEXT NOT NULL,
        reason TEXT NOT NULL,
        payload {blob} NOT NULL,
        received_at {real} NOT NULL
    );
    """,
    # 2: review labels from the devices' local pages (topic <prefix>/<device_id>/reviews). Every label is kept
    # (keyed on its message_id); a crop labelled again has several rows, and readers take the latest.
    """
    CREATE TABLE review_labels (
        message_id TEXT PRIMARY KEY,
        device_id TEXT NOT NULL,
        run_id TEXT NOT NULL,
        crop_id INTEGER NOT NULL,
        sample_id TEXT,
        frame_sequence INTEGER,
        label TEXT NOT NULL,
        selected TEXT NOT NULL,
        model_label TEXT NOT NULL,
        p_all {real} NOT NULL,
        reviewer TEXT NOT NULL,
        reviewed_at TEXT NOT NULL,
        received_at {real} NOT NULL,
        json TEXT NOT NULL
    );
    CREATE INDEX review_labels_sample ON review_labels (sample_id);
    CREATE INDEX review_labels_crop ON review_labels (device_id, crop_id, reviewed_at);
    """,
    # 3: the order results were stored in, so per-device order can be checked in either database. SQLite's
    # rowid already is that order (``{stored_order}`` is empty there); PostgreSQL gains a BIGSERIAL column
    # (existing rows are numbered in their physical order, the best record of their arrival there is).
    """
    {stored_order}
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)
#: The only words of the schema that differ between the two databases.
TYPES = {"sqlite": {"id": "INTEGER PRIMARY KEY", "real": "REAL", "blob": "BLOB", "stored_order": ""},
         "postgresql": {"id": "BIGSERIAL PRIMARY KEY", "real": "DOUBLE PRECISION", "blob": "BYTEA",
                        "stored_order": "ALTER TABLE frame_results ADD COLUMN stored_order BIGSERIAL"}}
#: The column that numbers frame results in the order they were stored.
STORED_ORDER = {"sqlite": "rowid", "postgresql": "stored_order"}


RESULT_COLUMNS = "message_id, device_id, run_id, sequence, sample_id, time, cells, blasts, unclassified, received_at, json"
RESULT_INSERT = f"INSERT INTO frame_results ({RESULT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (message_id) DO NOTHING"


def _result_row(item: Message, now: float) -> tuple:
    body, counts = item.body, item.body["counts"]  # type: ignore[index]
    return (body["message_id"], item.device_id, body["run_id"], body["sequence"], body["sample_id"], body["time"],
            counts["cells"], counts["blasts"], counts["unclassified"], now, item.raw.decode())


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
    """The results database; ``Store(path)`` for SQLite, ``Store(url=...)`` for PostgreSQL."""

    def __init__(self, path: Path | None = None, *, url: str | None = None, password: str | None = None) -> None:
        self.path = path
        self.kind = "postgresql" if url else "sqlite"
        self.where = _redacted(url) if url else str(path)
        self.db: Any = self._connect_postgresql(url, password) if url else self._connect_sqlite(path)
        self._migrate()
        if self.kind == "postgresql":  # the landing table of ``write``'s COPY, private to this connection
            self.execute("CREATE TEMPORARY TABLE IF NOT EXISTS incoming_results"
                         " (LIKE frame_results INCLUDING DEFAULTS) ON COMMIT DELETE ROWS")

    @staticmethod
    def _connect_sqlite(path: Path | None) -> sqlite3.Connection:
        if path is None:
            raise UserError("database: set database.path (SQLite) or database.url (PostgreSQL)")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
        except (OSError, sqlite3.Error) as error:
            raise UserError(f"database {path} cannot be opened ({error}); check database.path and its folder's permissions") from None
        # FULL: a commit is on disk before the broker is acknowledged, so not even a power cut loses a result.
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA busy_timeout=5000")
        return db

    @staticmethod
    def _connect_postgresql(url: str, password: str | None) -> Any:
        try:
            import psycopg
        except ImportError:
            raise UserError("database.url needs the PostgreSQL driver: pip install 'leukoscope[collector]' (psycopg 3)") from None
        try:
            # autocommit: transactions are the explicit BEGIN/COMMIT of ``write`` and ``_migrate``, as with SQLite.
            return psycopg.connect(url, autocommit=True, connect_timeout=10, application_name="leukoscope-collector",
                                   **({"password": password} if password else {}))
        except psycopg.Error as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UserError(f"database {_redacted(url)} cannot be opened ({first}); check database.url, "
                            "the server and its pg_hba.conf") from None

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.kind == "postgresql" else sql

    def execute(self, sql: str, params: tuple = ()) -> Any:
        """One statement, written with ``?`` placeholders for either database."""
        return self.db.execute(self._sql(sql), params)

    def _migrate(self) -> None:
        self.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = self.execute("SELECT version FROM schema_version").fetchone()
        current = row[0] if row else 0
        if current > SCHEMA_VERSION:
            raise UserError(f"database {self.where} has schema version {current}, newer than this collector's "
                            f"{SCHEMA_VERSION}; upgrade leukoscope")
        for version in range(current, SCHEMA_VERSION):
            self.execute("BEGIN IMMEDIATE" if self.kind == "sqlite" else "BEGIN")
            try:
                if self.kind == "postgresql":
                    self.execute("LOCK TABLE schema_version IN EXCLUSIVE MODE")
                # Two processes opening a new database at once: one migrates, the other waits, then finds it done.
                row = self.execute("SELECT version FROM schema_version").fetchone()
                if (row[0] if row else 0) > version:
                    self.execute("COMMIT")
                    continue
                for statement in MIGRATIONS[version].format(**TYPES[self.kind]).split(";"):
                    if statement.strip():
                        self.execute(statement)
                self.execute("DELETE FROM schema_version")
                self.execute("INSERT INTO schema_version (version) VALUES (?)", (version + 1,))
                self.execute("COMMIT")
            except BaseException:
                self.execute("ROLLBACK")
                raise

    def schema_version(self) -> int:
        return self.execute("SELECT version FROM schema_version").fetchone()[0]

    def write(self, items: Iterable[Message | DeadLetter]) -> int:
        """Store a batch in one transaction; returns the rows that were new (repeats are ignored).

        Frame results, the bulk, go in as one ``executemany`` (SQLite) or one COPY and one INSERT
        (PostgreSQL); their order within the batch is kept."""
        now = time.time()
        items = list(items)
        results = [item for item in items if isinstance(item, Message) and item.kind == "results"]
        added = 0
        self.execute("BEGIN")
        try:
            if results and self.kind == "postgresql":
                # COPY into a session's temporary table (emptied at each commit), then one INSERT ... SELECT
                # that skips known message_ids: no statement per row, and COPY's rows are encoded in C.
                cursor = self.db.cursor()
                with cursor.copy(f"COPY incoming_results ({RESULT_COLUMNS}) FROM STDIN") as copy:
                    for item in results:
                        copy.write_row(_result_row(item, now))
                # stored_order was drawn by COPY, row by row in the batch's order (the landing table shares
                # frame_results' default), and is carried over, so the stored order is the order received.
                added += cursor.execute(f"INSERT INTO frame_results ({RESULT_COLUMNS}, stored_order) SELECT {RESULT_COLUMNS},"
                                        " stored_order FROM incoming_results ORDER BY stored_order"
                                        " ON CONFLICT (message_id) DO NOTHING").rowcount
            elif results:
                cursor = self.db.cursor()
                cursor.executemany(RESULT_INSERT, [_result_row(item, now) for item in results])
                added += max(cursor.rowcount, 0)
            for item in items:
                if not (isinstance(item, Message) and item.kind == "results"):
                    added += self._write_one(item, now)
            self.execute("COMMIT")
        except BaseException:
            self.execute("ROLLBACK")
            raise
        return added

    def _write_one(self, item: Message | DeadLetter, now: float) -> int:
        if isinstance(item, DeadLetter):
            self.execute("INSERT INTO dead_letters (topic, reason, payload, received_at) VALUES (?, ?, ?, ?)",
                         (item.topic, item.reason, item.raw, now))
            return 1
        body = item.body
        if item.kind == "samples":
            sample = body["sample_id"] if body["sample_id"] is not None else item.topic.rsplit("/", 1)[-1]
            # Retained summaries may come back out of order (a redelivery after a newer one): keep the
            # latest tally, judged by its start and its frame count, never the last to arrive.
            return self.execute(
                "INSERT INTO sample_summaries (device_id, sample_id, message_id, run_id, started, frames, final, received_at, json)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (device_id, sample_id) DO UPDATE SET"
                " message_id = excluded.message_id, run_id = excluded.run_id, started = excluded.started,"
                " frames = excluded.frames, final = excluded.final, received_at = excluded.received_at, json = excluded.json"
                " WHERE (excluded.started, excluded.frames, excluded.final) >"
                " (sample_summaries.started, sample_summaries.frames, sample_summaries.final)",
                (item.device_id, sample, body["message_id"], body["run_id"], body["started"], body["frames"],
                 int(body["final"]), now, item.raw.decode())).rowcount
        if item.kind == "reviews":
            cell = body["cell"]
            return self.execute(
                "INSERT INTO review_labels (message_id, device_id, run_id, crop_id, sample_id, frame_sequence, label, selected,"
                " model_label, p_all, reviewer, reviewed_at, received_at, json) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (message_id) DO NOTHING",
                (body["message_id"], item.device_id, body["run_id"], body["crop_id"], cell["sample_id"], cell["frame_sequence"],
                 body["label"], cell["selected"], cell["model"]["label"], cell["model"]["p_all"], body["reviewer"],
                 body["reviewed_at"], now, item.raw.decode())).rowcount
        if item.kind == "status":
            self.execute("INSERT INTO device_status (device_id, status, received_at) VALUES (?, ?, ?) ON CONFLICT (device_id)"
                         " DO UPDATE SET status = excluded.status, received_at = excluded.received_at", (item.device_id, body, now))
            return 1
        self.execute("INSERT INTO device_stats (device_id, run_id, received_at, json) VALUES (?, ?, ?, ?)",
                     (item.device_id, body.get("run_id"), now, item.raw.decode()))
        return 1

    # -- reading ------------------------------------------------------------------------------
    def gaps(self, device_id: str | None = None) -> list[Gap]:
        """Runs of sequence numbers missing between the first and the last a device's results carried."""
        rows = self.execute(
            "SELECT device_id, sequence, next FROM (SELECT device_id, sequence, LEAD(sequence) OVER"
            " (PARTITION BY device_id ORDER BY sequence) AS next FROM (SELECT DISTINCT device_id, sequence FROM frame_results"
            " WHERE CAST(? AS TEXT) IS NULL OR device_id = ?) AS d) AS n WHERE next > sequence + 1 ORDER BY device_id, sequence",
            (device_id, device_id))
        return [Gap(device, sequence + 1, following - 1) for device, sequence, following in rows]

    def sequence_ranges(self, device_id: str | None = None) -> list[tuple[str, int, int, int, int]]:
        """Per device: (device_id, results stored, first and last sequence, sequences carried by more than one message_id)."""
        return [tuple(row) for row in self.execute(
            "SELECT device_id, COUNT(*), MIN(sequence), MAX(sequence), COUNT(*) - COUNT(DISTINCT sequence) FROM frame_results"
            " WHERE CAST(? AS TEXT) IS NULL OR device_id = ? GROUP BY device_id ORDER BY device_id", (device_id, device_id))]

    def out_of_order(self) -> int:
        """Results stored after one of the same device with a higher sequence number (0 when order was kept)."""
        return int(self.execute(
            f"SELECT COUNT(*) FROM (SELECT sequence, LAG(sequence) OVER (PARTITION BY device_id ORDER BY {STORED_ORDER[self.kind]})"
            " AS before FROM frame_results) AS o WHERE sequence < before").fetchone()[0])

    def dead_letters(self, limit: int = 50) -> list[tuple[float, str, str, bytes]]:
        return [(at, topic, reason, bytes(payload)) for at, topic, reason, payload in self.execute(
            "SELECT received_at, topic, reason, payload FROM dead_letters ORDER BY id DESC LIMIT ?", (limit,))]

    def frames_of(self, sample_id: str) -> list[dict]:
        return [json.loads(text) for (text,) in self.execute(
            "SELECT json FROM frame_results WHERE sample_id = ? ORDER BY time, device_id, sequence", (sample_id,))]

    def summaries_of(self, sample_id: str) -> list[dict]:
        return [json.loads(text) for (text,) in self.execute(
            "SELECT json FROM sample_summaries WHERE sample_id = ? ORDER BY device_id", (sample_id,))]

    def review_labels_of(self, sample_id: str) -> list[dict]:
        """The latest label of each reviewed crop of a sample's cells (a crop labelled again counts once, as
        its newest label: ``reviewed_at``, then arrival), as the label payloads, oldest crop first."""
        rows = self.execute(
            "SELECT device_id, crop_id, reviewed_at, received_at, json FROM review_labels WHERE sample_id = ?"
            " ORDER BY device_id, crop_id, reviewed_at, received_at", (sample_id,)).fetchall()
        latest: dict[tuple[str, int], str] = {}
        for device_id, crop_id, _, _, text in rows:
            latest[(device_id, crop_id)] = text
        return [json.loads(text) for text in latest.values()]

    def latest_stats(self, device_id: str) -> dict | None:
        row = self.execute("SELECT json FROM device_stats WHERE device_id = ? ORDER BY id DESC LIMIT 1", (device_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def close(self) -> None:
        self.db.close()


def _redacted(url: str) -> str:
    """The URL without its password, for messages and logs."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def open_store(database: Any) -> Store:
    """The store a validated ``DatabaseConfig`` names."""
    if database.url:
        return Store(url=database.url, password=database.password())
    return Store(database.path)
