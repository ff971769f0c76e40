"""``quantize splitter``: a ``trainer splitter`` run's model, full-integer int8, added to a model bundle.

Why in the bundle: the device verifies, updates and rolls back one thing. The splitter is small
(~80 kB) and travels with the classifier; a bundle without one keeps the classical split. Parity is
measured on the run's held-out clusters (cells the splitter never saw) with the device's own code:
the int8 model must find the same cells as the float one.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from edge import __version__
from edge.bundle import load_bundle, write_manifest
from edge.console import progress
from edge.errors import UserError
from edge.segmentation import SegmentationSettings
from edge.splitter import CONTRACTS, CellSplitter, cells_from_distance
from quantize.export import convert_uint8_io
from trainer.splitter import CALIBRATION_FILE, METRICS_FILE, MODEL_FILE

SPLITTER_MODEL = "splitter_int8.tflite"
#: Least share of held-out clusters in which int8 finds as many cells as float does.
MIN_COUNT_AGREEMENT = 0.95


def convert_splitter(model, fields: np.ndarray) -> bytes:
    """uint8 image in, uint8 inner distance out, int8 inside. Height and width stay open (-1 in the
    model's shape signature): the upsampling then reads its output size from its input at run time, so
    the device can resize the input to each region it looks at (a fixed size is baked into it otherwise)."""
    import keras

    region = keras.Input((None, None, 3), batch_size=1, name="region")
    return convert_uint8_io(keras.Model(region, model(region, training=False), name="splitter_b1"), fields,
                            "splitter int8", unit="field")


def add_splitter(run: Path, bundle_root: Path, min_count_agreement: float = MIN_COUNT_AGREEMENT) -> dict:
    """Convert ``run``'s splitter, measure int8 against float, and add it to the bundle; its manifest."""
    import keras

    bundle = load_bundle(bundle_root)
    missing = [name for name in (MODEL_FILE, CALIBRATION_FILE, METRICS_FILE) if not (run / name).is_file()]
    if missing:
        raise UserError(f"{run} is not a `trainer splitter` run (no {', '.join(missing)}); train one with `trainer splitter`")
    try:
        model = keras.models.load_model(run / MODEL_FILE, compile=False)
        data = np.load(run / CALIBRATION_FILE)
        metrics = json.loads((run / METRICS_FILE).read_text())
        scale, held_out, fields = float(metrics["um_per_px"]), metrics["held_out"], data["images"]
        contract = metrics["contract"]  # what the run taught (a run of an older trainer: inner-distance-v1)
    except Exception as error:  # Keras, NumPy and JSON each raise their own on a damaged file
        raise UserError(f"{run} holds a damaged splitter run ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
                        "train it again with `trainer splitter`") from None
    if contract not in CONTRACTS:
        raise UserError(f"{run} taught splitter contract {contract!r}, which this leukoscope does not implement "
                        f"({', '.join(CONTRACTS)}); train it again with `trainer splitter`")
    staged = bundle_root / f".{SPLITTER_MODEL}.new"
    staged.write_bytes(convert_splitter(model, fields))
    splitter = CellSplitter(staged, um_per_px=scale, contract=contract, num_threads=2)
    diameter = SegmentationSettings.cell_diameter_um / scale
    same_count, differences = 0, []
    for field in progress(data["held_out"], desc="int8 vs float", unit="field"):
        float_map = model.predict(field[None], verbose=0)[0, ..., 0]
        int8_map = splitter.distance(field)
        differences.append(float(np.abs(float_map - int8_map).mean()))
        same_count += len(cells_from_distance(float_map, diameter)) == len(cells_from_distance(int8_map, diameter))
    parity = {"held_out_fields": len(data["held_out"]), "same_cell_count": round(same_count / len(data["held_out"]), 4),
              "mean_abs_difference": round(float(np.mean(differences)), 5), "min_same_cell_count": min_count_agreement}
    if parity["same_cell_count"] < min_count_agreement:
        staged.unlink()
        raise UserError(f"int8 splitter finds as many cells as float in only {parity['same_cell_count']:.1%} of held-out "
                        f"fields (< {min_count_agreement:.0%}); train longer or with more --clusters")
    staged.replace(bundle_root / SPLITTER_MODEL)
    manifest = dict(bundle.manifest)
    manifest["splitter"] = {
        "file": SPLITTER_MODEL, "contract": contract, "um_per_px": scale, "parity": parity, "held_out": held_out,
        "provenance": {"source_run": str(run.resolve()), "exported_with": __version__,
                       "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    }
    write_manifest(bundle_root, manifest)
    load_bundle(bundle_root)  # what we hand over must verify
    _write_card_section(bundle_root, manifest["splitter"])
    return manifest


def splitter_to_carry(source_root: Path) -> dict:
    """The verified splitter entry of the bundle at ``source_root``, for ``carry_splitter``; a one-line
    ``UserError`` when there is none to take (checked before an export's conversion, not after it)."""
    try:
        source = load_bundle(source_root)
    except UserError as error:
        raise UserError(f"--splitter-from: {error}") from None
    record = source.manifest.get("splitter")
    if record is None:
        raise UserError(f"--splitter-from {source_root} holds no splitter; pass a bundle that has one, "
                        "or --no-splitter to leave it out")
    return record


def carry_splitter(source_root: Path, record: dict, bundle_root: Path, manifest: dict) -> dict:
    """``source_root``'s splitter (``record``: its manifest entry; its file; its card section) added to the
    bundle being written at ``bundle_root``; the new manifest. Why: the splitter does not depend on the
    classifier, so a re-exported or site-fine-tuned classifier keeps the splitter its device already runs
    instead of falling back to the classical split (0.700 of clustered cells found against 0.960, README)
    for want of a `trainer splitter` run. Its parity and held-out figures stay true: the same bytes."""
    shutil.copyfile(source_root / record["file"], bundle_root / record["file"])
    record = {**record, "provenance": {**record.get("provenance", {}), "carried_from": str(source_root.resolve()),
                                       "carried": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}
    manifest = {**manifest, "splitter": record}
    write_manifest(bundle_root, manifest)
    _write_card_section(bundle_root, record)
    return manifest


def _write_card_section(bundle_root: Path, record: dict) -> None:
    """The model card's splitter section, in place of any there was."""
    card = bundle_root / "MODEL_CARD.md"
    if card.is_file():
        text = card.read_text().split("\n## Cell splitter\n")[0].rstrip("\n")
        card.write_text(text + "\n\n## Cell splitter\n" + splitter_card(record))


def splitter_card(record: dict) -> str:
    """The model card's section on the splitter: what it is, what it was measured on."""
    held, parity = record["held_out"], record["parity"]
    return (f"`{record['file']}` ({record['contract']}, at {record['um_per_px']} µm/px) tells touching white cells apart "
            f"(`edge/splitter.py`). Trained on clusters composed from half of the C-NMC and PBC cells on PBC smear fields; "
            f"on clusters of the other half it found {held['found_alone']} of {held['cells']} cells on their own "
            f"({held['rate']:.3f}, float). int8 finds as many cells as float in {parity['same_cell_count']:.1%} of "
            f"{parity['held_out_fields']} held-out fields. It has never seen a real crowded leukaemic smear: composed "
            f"clusters are its only measure."
            + (f" Carried unchanged from the bundle `{record['provenance']['carried_from']}`." if "carried_from" in record.get("provenance", {}) else "")
            + "\n")
