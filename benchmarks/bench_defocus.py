"""Blasts and normal cells on a smear with the focus a little off: does the device's decision hold?

    python benchmarks/bench_defocus.py [--step 10] [--blur-um 0,0.1,0.2,0.3,0.5]

A technician focuses by eye, and a device's focus drifts. Real C-NMC cells (blasts and normal B-cells,
every ``step``-th image of each class) are cut along their outline and placed apart on real BCCD smear
fields at BCCD's scale (``tests.composing``), four to a frame; each frame is then blurred by a Gaussian of
each ``--blur-um`` micrometres and goes through the device's own pipeline (segmentation, quality gate, µm
crop, the shipped int8 model). Per class: cells classified, the share called ALL, cells the gate set aside
as out of focus, and the share of decisions that are the same as on the sharp frame. Healthy blood under the
same blur: ``bench_crosslab.py --shifts`` (``defocus_*``). The C-NMC cells include patients the model trained
on, so the sharp frame's share called ALL is optimistic; what the benchmark measures is how far blur moves it.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge.classifier import Classifier  # noqa: E402
from edge.pipeline import Pipeline  # noqa: E402
from edge.segmentation import SegmentationSettings  # noqa: E402
from edge.sources import Frame  # noqa: E402
from benchmarks.bench_robustness import defocus  # noqa: E402
from tests.composing import BCCD_UM_PER_PX, background, box_iou, cnmc_cell, cnmc_files, kind, paste  # noqa: E402

#: Where the four cells of a frame go (fractions of the 1280x960 field): far enough apart to be found alone.
PLACES = ((0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75))


def frames(step: int) -> list[tuple[int, list, list]]:
    """(background index, [(cut cell, centre)], [kind]) for four cells at a time."""
    files = cnmc_files(step)
    composed = []
    for start in range(0, len(files), len(PLACES)):
        group = files[start:start + len(PLACES)]
        field = background(start // len(PLACES))
        height, width = field.shape[:2]
        placed = [(cnmc_cell(path), (int(fx * width), int(fy * height))) for path, (fx, fy) in zip(group, PLACES)]
        composed.append((start // len(PLACES), placed, [kind(path) for path in group]))
    return composed


def measure(pipeline: Pipeline, composed: list, change: Callable[[np.ndarray], np.ndarray], positive: str,
            zoom: float = 1.0) -> tuple[dict, dict]:
    """Per kind: counts on the frames changed by ``change`` (shown ``zoom`` times larger: the pipeline's scale must
    match); and each cell's (kind, decision) (True: ALL; None: not classified)."""
    counts: dict[str, Counter] = {}
    decisions: dict = {}
    for index, placed, kinds in composed:
        frame = background(index)
        boxes = [paste(frame, cell, centre) for cell, centre in placed]
        result, _, _ = pipeline.process(Frame(image=change(frame), name=f"field_{index}"))
        for number, (box, name) in enumerate(zip(boxes, kinds)):
            box = tuple(round(v * zoom) for v in box)
            row = counts.setdefault(name, Counter())
            row["placed"] += 1
            classified = [c for c in result["cells"] if box_iou(c["bbox"], box) >= 0.5]
            aside = [c for c in result["unclassified"] if box_iou(c["bbox"], box) >= 0.5]
            decisions[(index, number)] = (name, classified[0]["label"] == positive if classified else None)
            row["classified"] += bool(classified)
            row["called_all"] += bool(classified) and classified[0]["label"] == positive
            row["out_of_focus"] += any(c["reason"] == "out of focus" for c in aside)
    return {name: dict(row) for name, row in sorted(counts.items())}, decisions


def compared(runs: dict[str, tuple[dict, dict]], reference: str, same: str) -> dict:
    """Each run's counts with the share called ALL, and (key ``same``) the share of decisions that are those of the
    ``reference`` run, per kind; cells classified in both only."""
    first = runs[reference][1]
    for counts, decisions in runs.values():
        for name, row in counts.items():
            row["called_all_rate"] = round(row["called_all"] / max(row["classified"], 1), 3)
            both = [(decision, first[key][1]) for key, (of, decision) in decisions.items()
                    if of == name and decision is not None and first[key][1] is not None]
            row[same] = round(sum(a == b for a, b in both) / max(len(both), 1), 3)
    return {label: counts for label, (counts, _) in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=ROOT / "models" / "default")
    parser.add_argument("--step", type=int, default=10, help="every N-th C-NMC image of each class")
    parser.add_argument("--blur-um", default="0,0.1,0.2,0.3,0.5", help="Gaussian sigmas in micrometres, comma-separated")
    args = parser.parse_args()
    started = time.perf_counter()
    classifier = Classifier(args.bundle)
    pipeline = Pipeline(classifier, SegmentationSettings(um_per_px=BCCD_UM_PER_PX))
    positive = classifier.bundle.positive_label
    composed = frames(args.step)
    blurs = sorted({0.0, *(float(value) for value in args.blur_um.split(","))})  # the sharp frame is the reference
    runs = {f"{blur:g} um": measure(pipeline, composed, defocus(blur), positive) for blur in blurs}
    report: dict = {"bundle": str(args.bundle), "um_per_px": BCCD_UM_PER_PX, "frames": len(composed),
                    "blur": compared(runs, "0 um", "same_decision_as_sharp")}
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
