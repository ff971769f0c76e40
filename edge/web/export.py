"""``edge export-reviews``: the crops people reviewed on the device, as a training source.

The layout is the trainer's plain C-NMC one, ``OUT/{all,hem}/UID_<n>_<crop>_1_<all|hem>.jpg``: "blast"
goes to ``all``, "normal" to ``hem``; "not a cell" and "unsure" are left out (counted). The images are the
review views, every one the same 36 µm field at 0.125 µm per pixel, declared in ``leukoscope-scale.json``,
so the trainer cuts them as the device does. C-NMC names want numeric patient ids: each sample id gets a
number n (blasts: ``n``, normal cells: ``Hn``; the map is in ``provenance.json``), so the trainer's
patient split keeps one sample's cells of a class together. ``provenance.jsonl`` holds each label's full
payload (device, bundle, scale, stain reference, time, reviewer).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from edge.calibration import SCALE_FILE
from edge.errors import UserError
from edge.web.reviews import VIEW_FIELD_UM, VIEW_UM_PER_PX, ReviewStore

FOLDER = {"blast": "all", "normal": "hem"}


def export_reviews(db: Path, out: Path, *, overwrite: bool = False) -> dict:
    """Write the reviewed crops of ``db`` under ``out``; returns counts. One-line errors for a missing
    database, a non-empty ``out`` (unless ``overwrite``) or nothing reviewed."""
    if not db.is_file():
        raise UserError(f"review database {db} does not exist; give --db (web.review_db of the device's config)")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} is not empty; choose a new folder or pass --overwrite")
    store = ReviewStore(db)
    try:
        rows = store.export_rows()
    finally:
        store.close()
    usable = [r for r in rows if r["label"] in FOLDER]
    if not usable:
        raise UserError(f"{db} holds no crop labelled blast or normal yet ({len(rows)} reviewed); review some on the page first")
    samples = sorted({r["payload"]["cell"]["sample_id"] or "no-sample" for r in usable})
    number = {sample: i + 1 for i, sample in enumerate(samples)}
    for folder in FOLDER.values():
        (out / folder).mkdir(parents=True, exist_ok=True)
    with (out / "provenance.jsonl").open("w") as provenance:
        for row in usable:
            folder = FOLDER[row["label"]]
            n = number[row["payload"]["cell"]["sample_id"] or "no-sample"]
            patient = f"H{n}" if folder == "hem" else str(n)
            name = f"UID_{patient}_{row['id']}_1_{folder}.jpg"
            (out / folder / name).write_bytes(row["view"])
            provenance.write(json.dumps({"file": f"{folder}/{name}", **row["payload"]}) + "\n")
    (out / SCALE_FILE).write_text(json.dumps({"um_per_px": VIEW_UM_PER_PX, "measured_by": "edge export-reviews",
                                              "field_um": VIEW_FIELD_UM}, indent=2) + "\n")
    counts = {"exported": dict(Counter(FOLDER[r["label"]] for r in usable)),
              "left_out": dict(Counter(r["label"] for r in rows if r["label"] not in FOLDER)), "samples": number}
    (out / "provenance.json").write_text(json.dumps({"source": str(db), **counts}, indent=2) + "\n")
    return counts
