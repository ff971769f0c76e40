"""Touching cells split: clusters of 2-8 real cells, how many are found each on its own (target >= 0.95).

    python benchmarks/bench_clusters.py [--per-size 30] [--seed 0]

Each cluster is composed by ``tests/composing.py``: real C-NMC and PBC cells cut with their masks,
resampled to BCCD's scale and placed one by one touching an earlier cell, overlapping it by up to
20% of their radii, on a real white-cell-free BCCD smear field. A cell counts as found on its own
when one found cell's box, matched one to one, overlaps its box with IoU >= 0.5. Also counted:
found boxes that match no placed cell (a wrong split or a merge). Prints one JSON object, per size.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge.segmentation import SegmentationSettings, find_cells  # noqa: E402
from tests.composing import BCCD_UM_PER_PX, cluster, found_alone  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-size", type=int, default=30, help="clusters of each size 2..8")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    settings = SegmentationSettings(um_per_px=BCCD_UM_PER_PX)
    rng = np.random.default_rng(args.seed)
    started = time.perf_counter()
    sizes: dict[int, dict[str, int]] = {}
    index = 0
    for _ in range(args.per_size):
        for size in range(2, 9):
            frame, boxes = cluster(rng, size, index)
            index += 1
            found = find_cells(frame, settings)
            hits = found_alone(boxes, found)
            row = sizes.setdefault(len(boxes), {"cells": 0, "found_alone": 0, "unmatched_boxes": 0})
            row["cells"] += len(boxes)
            row["found_alone"] += hits
            row["unmatched_boxes"] += len(found) - hits
    cells = sum(r["cells"] for r in sizes.values())
    alone = sum(r["found_alone"] for r in sizes.values())
    report = {"clusters": index, "cells": cells, "found_alone": alone, "rate": round(alone / cells, 3),
              "unmatched_boxes": sum(r["unmatched_boxes"] for r in sizes.values()),
              "by_size": {str(k): {**r, "rate": round(r["found_alone"] / r["cells"], 3)} for k, r in sorted(sizes.items())},
              "seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
