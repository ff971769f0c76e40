"""Touching cells split: clusters of 2-8 real cells, how many are found each on its own (target >= 0.95).

    python benchmarks/bench_clusters.py [--per-size 30] [--seed 0] [--bundle models/default]

Each cluster is composed by ``tests/composing.py``: real C-NMC and PBC cells cut with their masks,
resampled to BCCD's scale and placed one by one touching an earlier cell, overlapping it by up to
20% of their radii, on a real white-cell-free BCCD smear field. A cell counts as found on its own
when one found cell's box, matched one to one, overlaps its box with IoU >= 0.5. Also counted:
found boxes that match no placed cell (a wrong split or a merge). The same clusters are measured
with the classical split alone and with the bundle's learned splitter (when it has one), with the
segmentation's median time per frame for each. The cells are from the half the splitter was never
trained on (``trainer.clusters.half``), on BCCD fields (another lab). Also: whether the classifier
decides on each found cell as it does on the same cell found alone on the same field (what a crop cut
from a cluster costs the verdict), and the rate by kind of cell (C-NMC blasts and normals, each PBC
type). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge.assets import DEFAULT_BUNDLE  # noqa: E402
from edge.bundle import load_bundle  # noqa: E402
from edge.segmentation import SegmentationSettings, find_cells  # noqa: E402
from edge.splitter import CellSplitter  # noqa: E402
from edge.classifier import Classifier  # noqa: E402
from edge.pipeline import Pipeline  # noqa: E402
from tests.composing import BCCD_UM_PER_PX, background, box_iou, cluster, matches, paste, use_pool  # noqa: E402


class Composed(NamedTuple):
    frame: np.ndarray
    boxes: list
    index: int  # its background
    placements: list  # (cell, centre) of each placed cell, in the boxes' order
    kinds: list  # what each placed cell is (tests.composing.kind), in the boxes' order


def alone_scores(composed: list[Composed], pipeline: Pipeline, settings: SegmentationSettings) -> list[list[float | None]]:
    """P(ALL) of each placed cell found on the same field with no other cell near it (None: not found)."""
    scores = []
    for item in composed:
        row: list[float | None] = []
        for (cell, centre), box in zip(item.placements, item.boxes):
            frame = background(item.index)
            paste(frame, cell, centre)
            found = [c for c in find_cells(frame, settings) if box_iou(c.bbox, box) >= 0.5]
            row.append(float(pipeline.classifier.scores(pipeline.crops(frame, found[:1]))[0]) if found else None)
        scores.append(row)
    return scores


def measure(composed: list[Composed], splitter: CellSplitter | None, settings: SegmentationSettings,
            pipeline: Pipeline, alone: list[list[float | None]]) -> dict:
    sizes: dict[int, dict[str, int]] = {}
    kinds: dict[str, list[int]] = {}  # kind -> [cells, found on their own]
    times, agree, shift = [], [], []
    threshold = pipeline.classifier.threshold
    for item, lone in zip(composed, alone):
        started = time.perf_counter()
        found = find_cells(item.frame, settings, splitter)
        times.append(time.perf_counter() - started)
        pairs = matches(item.boxes, found)
        row = sizes.setdefault(len(item.boxes), {"cells": 0, "found_alone": 0, "unmatched_boxes": 0})
        row["cells"] += len(item.boxes)
        row["found_alone"] += len(pairs)
        row["unmatched_boxes"] += len(found) - len(pairs)
        for k, name in enumerate(item.kinds):
            counts = kinds.setdefault(name, [0, 0])
            counts[0] += 1
            counts[1] += k in pairs
        placed = [k for k in pairs if lone[k] is not None]
        in_cluster = pipeline.classifier.scores(pipeline.crops(item.frame, [found[pairs[k]] for k in placed]))
        for k, score in zip(placed, in_cluster):
            agree.append((score >= threshold) == (lone[k] >= threshold))
            shift.append(abs(float(score) - lone[k]))
    cells = sum(r["cells"] for r in sizes.values())
    alone_found = sum(r["found_alone"] for r in sizes.values())
    return {"cells": cells, "found_alone": alone_found, "rate": round(alone_found / cells, 3),
            "unmatched_boxes": sum(r["unmatched_boxes"] for r in sizes.values()),
            "by_size": {str(k): {**r, "rate": round(r["found_alone"] / r["cells"], 3)} for k, r in sorted(sizes.items())},
            "by_kind": {k: {"cells": n, "found_alone": f, "rate": round(f / n, 3)} for k, (n, f) in sorted(kinds.items())},
            "same_decision_as_alone": {"cells": len(agree), "rate": round(float(np.mean(agree)), 3) if agree else None,
                                       "median_abs_p_all_shift": round(float(np.median(shift)), 3) if shift else None},
            "segment_ms_median": round(1000 * float(np.median(times)), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-size", type=int, default=30, help="clusters of each size 2..8")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cnmc-step", type=int, default=25, help="cells from every Nth C-NMC image (of the held-out half)")
    parser.add_argument("--pbc-step", type=int, default=97, help="cells from every Nth PBC image (of the held-out half)")
    parser.add_argument("--absorb", action="store_true",
                        help="cells filter the light instead of being pasted: no pasted edge where they overlap")
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE, help="bundle whose splitter is measured (default: shipped)")
    args = parser.parse_args()
    settings = SegmentationSettings(um_per_px=BCCD_UM_PER_PX)
    splitter = CellSplitter.of(load_bundle(args.bundle))
    use_pool(args.cnmc_step, args.pbc_step)
    rng = np.random.default_rng(args.seed)
    started = time.perf_counter()
    composed = []
    for index in range(args.per_size):
        for size in range(2, 9):
            placements: list = []
            kinds: list = []
            frame, boxes = cluster(rng, size, index * 7 + size - 2, args.absorb, placements, kinds)
            composed.append(Composed(frame, boxes, index * 7 + size - 2, placements, kinds))
    pipeline = Pipeline(Classifier(args.bundle), settings)
    alone = alone_scores(composed, pipeline, settings)
    report = {"clusters": len(composed), "pool": {"cnmc_step": args.cnmc_step, "pbc_step": args.pbc_step},
              "absorb": args.absorb, "frame": list(composed[0].frame.shape[1::-1]), "um_per_px": BCCD_UM_PER_PX,
              "cells_found_alone_on_the_field": sum(s is not None for row in alone for s in row),
              "classical": measure(composed, None, settings, pipeline, alone)}
    if splitter is not None:
        report["learned"] = measure(composed, splitter, settings, pipeline, alone)
        report["learned_over_classical"] = round(report["learned"]["rate"] / report["classical"]["rate"], 3)
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
