"""How many clean single cells the quality gate drops (target <= 2%), by reason, on three labs' real cells.

    python benchmarks/bench_gate.py [--data ../shared/data] [--step 1]

* PBC (pbc-normal): the found cell nearest the image centre (each image is one centred cell), at the
  scale its red cells give (``edge.calibration``);
* C-NMC (cnmc-dev all + hem): the one cell of each crop, at C-NMC's reference scale;
* BCCD: found cells that match an annotated white-cell box clear of the frame border, at the scale
  its red cells give.
Every one of these is a clean, intact, in-focus white cell, so every drop is a false rejection.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge.calibration import calibrate  # noqa: E402
from trainer.dataset import CNMC_UM_PER_PX  # noqa: E402
from edge.gate import judge  # noqa: E402
from edge.preprocessing import read_rgb  # noqa: E402
from edge.segmentation import SegmentationSettings, find_cells  # noqa: E402
from trainer.crosslab import wbc_boxes  # noqa: E402


def _scale(files: list[Path]) -> float:
    return float(calibrate([read_rgb(p) for p in files[::max(1, len(files) // 40)][:40]]).um_per_px)


def _report(verdicts: list, um_per_px: float) -> dict:
    reasons = Counter(v.reason for v in verdicts if v.reason)
    focus = [v.focus for v in verdicts]
    cells, dropped = len(verdicts), sum(reasons.values())
    return {"cells": cells, "dropped": dropped, "drop_rate": round(dropped / max(cells, 1), 4), "um_per_px": round(um_per_px, 4),
            "reasons": dict(reasons), "focus_p1_p50": [round(float(np.percentile(focus, q)), 1) for q in (1, 50)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--step", type=int, default=1, help="use every N-th image (1: all)")
    args = parser.parse_args()
    started = time.perf_counter()
    report = {}

    pbc = sorted(p for p in (args.data / "pbc-normal").glob("*/*.jpg") if not p.name.startswith("."))  # macOS ._ files
    scale = _scale(pbc)
    verdicts = []
    for path in pbc[::args.step]:
        image = read_rgb(path)
        found = find_cells(image, SegmentationSettings(um_per_px=scale))
        if not found:
            continue
        centre = np.array(image.shape[1::-1]) / 2
        cell = min(found, key=lambda c: np.linalg.norm(np.array(c.bbox[:2]) + np.array(c.bbox[2:]) / 2 - centre))
        verdicts.append(judge(image, cell, scale))
    report["pbc"] = _report(verdicts, scale)

    verdicts = []
    for path in sorted((args.data / "cnmc-dev").glob("*/*.png"))[::args.step]:
        image = read_rgb(path)
        verdicts.extend(judge(image, cell, CNMC_UM_PER_PX) for cell in find_cells(image))
    report["cnmc"] = _report(verdicts, CNMC_UM_PER_PX)

    frames = sorted((args.data / "bccd" / "JPEGImages").glob("*.jpg"))
    scale = _scale(frames)
    verdicts = []
    for path in frames[::args.step]:
        image = read_rgb(path)
        boxes = wbc_boxes(args.data / "bccd" / "Annotations" / (path.stem + ".xml"))
        for cell in find_cells(image, SegmentationSettings(um_per_px=scale)):
            x, y, w, h = cell.bbox
            cx, cy = x + w / 2, y + h / 2
            if not any(b[0] <= cx <= b[2] and b[1] <= cy <= b[3] and min(b[0], b[1]) > 5
                       and b[2] < image.shape[1] - 5 and b[3] < image.shape[0] - 5 for b in boxes):
                continue  # not an annotated white cell, or one the border cuts (a true rejection)
            verdicts.append(judge(image, cell, scale))
    report["bccd"] = _report(verdicts, scale)
    total = sum(r["cells"] for r in report.values())
    report["all"] = {"cells": total, "drop_rate": round(sum(r["dropped"] for r in report.values()) / total, 4),
                     "seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
