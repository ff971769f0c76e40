"""Review crops and the labels people give them, durable on the device (SQLite, like the outbox).

Why on the device: a person's confirmation of what the model flagged is the most valuable data a lab
has, and the device is where it is made; it must survive a power cut before it has reached anyone.
Why a random share of unflagged cells too: reviewing only what was flagged measures false blasts but
never the misses; a small random sample of the rest estimates how many blasts went unflagged.

Each crop keeps two images: the cell in a fixed 36 µm field as a person judges it (JPEG, 0.125 µm per
pixel; ``edge export-reviews`` writes these for fine-tuning) and the model's own input (PNG, its
SHA-256 in the label), which shows exactly what the model saw. Each label keeps its provenance (device, bundle, scale, stain reference, time,
reviewer), is stored before it is published, and is published through the outbox like a result.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from edge.errors import UserError
from edge.outbox import durable_sqlite
from edge.results import RUN_ID

REVIEW_SCHEMA = "leukoscope/review-label"
REVIEW_SCHEMA_VERSION = 1
#: What a reviewer may say about a crop (keyboard: b, n, x, u).
LABELS = ("blast", "normal", "not_a_cell", "unsure")
#: What a person sees of a cell, and what is exported for training: a 36 µm square (room for the largest
#: white cell and some of its neighbours) at 0.125 µm per pixel (288 px): half the model's pixel size, so
#: that the trainer's own crop brings it to the contract's scale as it does every other source.
VIEW_FIELD_UM = 36.0
VIEW_UM_PER_PX = 0.125

SCHEMA = """
CREATE TABLE IF NOT EXISTS crops (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    sample_id TEXT,
    frame_sequence INTEGER,
    source TEXT NOT NULL,
    bbox TEXT NOT NULL,
    p_all REAL NOT NULL,
    model_label TEXT NOT NULL,
    selected TEXT NOT NULL,
    provenance TEXT NOT NULL,
    view BLOB NOT NULL,
    model_input BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    crop_id INTEGER NOT NULL REFERENCES crops(id),
    label TEXT NOT NULL,
    reviewer TEXT NOT NULL,
    access TEXT NOT NULL,
    reviewed_at TEXT NOT NULL,
    payload BLOB NOT NULL,
    published INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS labels_crop ON labels (crop_id);
"""


@dataclass(frozen=True)
class Label:
    id: int
    crop_id: int
    label: str
    payload: bytes


def view_of(image: np.ndarray, bbox: list[int], um_per_px: float) -> bytes:
    """The cell centred in a fixed physical field (VIEW_FIELD_UM square at VIEW_UM_PER_PX), as JPEG.

    Fixed in micrometres, so that a person sees every cell at its true relative size, and so that the
    exported crops form one source at one scale that the trainer cuts exactly as the device does."""
    x, y, w, h = bbox
    half = VIEW_FIELD_UM / 2 / um_per_px  # frame pixels from the centre to the field's edge
    cx, cy = x + w / 2, y + h / 2
    left, top, right, bottom = (int(round(v)) for v in (cx - half, cy - half, cx + half, cy + half))
    pad = max(0, -left, -top, right - image.shape[1], bottom - image.shape[0])
    padded = cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_REFLECT_101) if pad else image
    region = padded[top + pad:bottom + pad, left + pad:right + pad]
    side = int(round(VIEW_FIELD_UM / VIEW_UM_PER_PX))
    factor = um_per_px / VIEW_UM_PER_PX
    region = cv2.resize(region, (side, side), interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(region, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])
    return data.tobytes()


class ReviewStore:
    """Crops waiting for review and the labels given, in one SQLite file (WAL, synchronous=FULL)."""

    def __init__(self, path: Path, *, max_crops: int = 2000) -> None:
        self.path = Path(path)
        self.max_crops = max_crops
        self._lock = threading.Lock()
        try:
            self._db = durable_sqlite(self.path, SCHEMA)
        except (sqlite3.Error, OSError) as error:
            raise UserError(f"web.review_db {self.path} cannot be opened ({error}); check the path and that its "
                            "directory is writable (StateDirectory= in the unit)") from None

    def add(self, *, image: np.ndarray, cell: dict, model_input: np.ndarray, result: dict, selected: str,
            provenance: dict) -> int:
        """Keep one cell for review; the oldest unreviewed crops go when there are more than ``max_crops``."""
        ok, png = cv2.imencode(".png", cv2.cvtColor(model_input, cv2.COLOR_RGB2BGR))
        view = view_of(image, cell["bbox"], provenance["scale"]["um_per_px"])
        row = (time.time(), result.get("sample_id"), result.get("sequence"), result["source"], json.dumps(cell["bbox"]),
               float(cell["p_all"]), cell["label"], selected, json.dumps(provenance), view, png.tobytes())
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cursor = self._db.execute(
                    "INSERT INTO crops (created, sample_id, frame_sequence, source, bbox, p_all, model_label, selected, "
                    "provenance, view, model_input) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
                self._db.execute(
                    "DELETE FROM crops WHERE id IN (SELECT id FROM crops WHERE id NOT IN (SELECT crop_id FROM labels) "
                    "ORDER BY id DESC LIMIT -1 OFFSET ?)", (self.max_crops,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return int(cursor.lastrowid)

    def pending(self, limit: int = 24) -> list[dict]:
        """Unreviewed crops, newest first. The model's call is left out on purpose: a reviewer who sees it
        tends to agree with it, and the labels are meant to measure the model."""
        with self._lock:
            rows = self._db.execute("SELECT id, sample_id, source, created FROM crops WHERE id NOT IN "
                                    "(SELECT crop_id FROM labels) ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [{"id": r[0], "sample_id": r[1], "source": r[2],
                 "time": time.strftime("%H:%M:%S", time.localtime(r[3]))} for r in rows]

    def reviewed(self, limit: int = 24) -> list[dict]:
        """The latest label of recently reviewed crops, with the model's call beside the person's."""
        with self._lock:
            rows = self._db.execute(
                "SELECT l.crop_id, l.label, l.reviewer, l.reviewed_at, c.model_label, c.p_all, c.selected, l.published "
                "FROM labels l JOIN crops c ON c.id = l.crop_id WHERE l.id IN (SELECT MAX(id) FROM labels GROUP BY crop_id) "
                "ORDER BY l.id DESC LIMIT ?", (limit,)).fetchall()
        return [{"id": r[0], "label": r[1], "reviewer": r[2], "reviewed_at": r[3], "model_label": r[4], "p_all": r[5],
                 "selected": r[6], "published": bool(r[7])} for r in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            crops = self._db.execute("SELECT COUNT(*) FROM crops").fetchone()[0]
            reviewed = self._db.execute("SELECT COUNT(DISTINCT crop_id) FROM labels").fetchone()[0]
            unpublished = self._db.execute("SELECT COUNT(*) FROM labels WHERE published = 0").fetchone()[0]
        return {"pending": crops - reviewed, "reviewed": reviewed, "unpublished": unpublished}

    def image(self, crop_id: int, kind: str = "view") -> bytes | None:
        column = "view" if kind == "view" else "model_input"
        with self._lock:
            row = self._db.execute(f"SELECT {column} FROM crops WHERE id = ?", (crop_id,)).fetchone()
        return None if row is None else bytes(row[0])

    def label(self, crop_id: int, label: str, reviewer: str, access: str, device_id: str) -> Label:
        """Store a person's label durably (committed before this returns) with its provenance; a crop may be
        labelled again, and the latest label counts. Raises ValueError for an unknown crop or label."""
        if label not in LABELS:
            raise ValueError(f"label must be one of {', '.join(LABELS)}")
        with self._lock:
            row = self._db.execute("SELECT sample_id, frame_sequence, source, bbox, p_all, model_label, selected, provenance, "
                                   "model_input FROM crops WHERE id = ?", (crop_id,)).fetchone()
            if row is None:
                raise LookupError(f"no crop {crop_id} (it may have been dropped as the oldest unreviewed one)")
            reviewed_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            provenance = json.loads(row[7])
            payload = json.dumps({
                "schema": REVIEW_SCHEMA, "schema_version": REVIEW_SCHEMA_VERSION, "message_id": str(uuid.uuid4()),
                "device_id": device_id, "run_id": RUN_ID, "crop_id": crop_id, "label": label, "reviewer": reviewer,
                "access": access, "reviewed_at": reviewed_at,
                "cell": {"sample_id": row[0], "frame_sequence": row[1], "source": row[2], "bbox": json.loads(row[3]),
                         "selected": row[6], "model": {"label": row[5], "p_all": row[4]},
                         "model_input_sha256": hashlib.sha256(bytes(row[8])).hexdigest()},
                **provenance,
            }).encode()
            self._db.execute("BEGIN IMMEDIATE")
            cursor = self._db.execute("INSERT INTO labels (crop_id, label, reviewer, access, reviewed_at, payload) "
                                      "VALUES (?, ?, ?, ?, ?, ?)", (crop_id, label, reviewer, access, reviewed_at, payload))
            self._db.execute("COMMIT")
        return Label(int(cursor.lastrowid), crop_id, label, payload)

    def unpublished(self) -> list[Label]:
        """Labels not yet handed to the outbox (a crash between storing and handing over leaves some)."""
        with self._lock:
            rows = self._db.execute("SELECT id, crop_id, label, payload FROM labels WHERE published = 0 ORDER BY id").fetchall()
        return [Label(int(r[0]), int(r[1]), r[2], bytes(r[3])) for r in rows]

    def mark_published(self, label_id: int) -> None:
        """The label is in the outbox now: from here the outbox owns its delivery."""
        with self._lock:
            self._db.execute("UPDATE labels SET published = 1 WHERE id = ?", (label_id,))

    def export_rows(self) -> list[dict]:
        """Every reviewed crop's latest label with its field view and the label's payload (for export)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT c.id, l.label, c.view, l.payload FROM labels l JOIN crops c ON c.id = l.crop_id "
                "WHERE l.id IN (SELECT MAX(id) FROM labels GROUP BY crop_id) ORDER BY c.id").fetchall()
        return [{"id": r[0], "label": r[1], "view": bytes(r[2]), "payload": json.loads(r[3])} for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()
