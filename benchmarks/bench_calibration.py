"""`edge calibrate`'s per-image spread on real smears (target: coefficient of variation <= 5% on PBC).

    python benchmarks/bench_calibration.py [--data ../shared/data] [--step 4]

Every PBC image (one microscope, one scale: 360 px crops of 100x smears of many donors) and every
18th BCCD frame is measured on its own red cells (``edge.calibration.measure_frame``); the per-image
estimates that ``edge calibrate`` keeps give the spread. Also printed: the spread a frame's median
of a few cells would have from sampling alone (the red cells' own size spread within a frame over
the square root of their count), and what is left of the spread once sampling is taken out
(``between_image_cv``): the films' real difference (thick and thin parts of a film, donors) that no
choice of cells removes, the floor any per-image rule meets. ``magnification``: BCCD frames shown
smaller, as a lower objective would, and tiled into 1080p and 12 MP frames: the scale measured times
the size shown should stay BCCD's, by ``edge calibrate``'s looks and by the agent's scale watch (which
expects the configured scale and looks at the frame's centre only). ``crowded``: BCCD's first 60 frames,
crowded with overlapping red cells, alone and tiled into 1080p frames edge to edge or 8 px apart. Prints one
JSON object.
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

from benchmarks.bench_pipeline import tiled  # noqa: E402
from edge.agent import SCALE_WATCH_PIXELS  # noqa: E402
from edge.calibration import Calibration, calibrate, measure_frame  # noqa: E402
from edge.preprocessing import read_rgb  # noqa: E402
from trainer.crosslab import BCCD_UM_PER_PX  # noqa: E402


def _report(files: list[Path]) -> dict:
    calibration = Calibration(tuple(measure_frame(read_rgb(p)) for p in files))
    kept = calibration.kept
    within = [float(np.std(f.diameters_px, ddof=1) / np.mean(f.diameters_px)) for f in kept if f.count >= 2]
    sampling = float(np.mean([np.median(within) / np.sqrt(f.count) for f in kept])) if kept else None
    return {"images": len(files), "measured": len(calibration.usable), "um_per_px": round(calibration.um_per_px or 0, 5),
            "cv": round(calibration.cv or 0, 4), "robust_cv": round(calibration.robust_cv or 0, 4),
            "red_cells_per_image": round(float(np.mean([f.count for f in kept])), 1) if kept else 0,
            "within_image_cv": round(float(np.median(within)), 4) if within else None,
            "sampling_cv": None if sampling is None else round(sampling, 4),
            "between_image_cv": None if sampling is None or calibration.cv is None
            else round(float(np.sqrt(max(calibration.cv ** 2 - sampling ** 2, 0.0))), 4)}


def _magnifications(bccd: Path) -> dict:
    """Another objective and camera: BCCD frames shown at 1, 0.5 and 0.33 of their size and tiled into
    1080p and 12 MP frames (8 each); the measured scale times the size shown, against BCCD's own."""
    import cv2

    sources = [read_rgb(p) for p in sorted((bccd / "JPEGImages").glob("*.jpg"))[:200]]
    report = {}
    for width, height in ((1920, 1080), (4056, 3040)):
        for shown in (1.0, 0.5, 0.33):
            small = [cv2.resize(s, None, fx=shown, fy=shown, interpolation=cv2.INTER_AREA) for s in sources] \
                if shown != 1.0 else sources
            h, w = small[0].shape[:2]
            frames = [np.ascontiguousarray(np.vstack([np.hstack([small[(7 * k + 50 * row + col) % len(small)]
                                                                 for col in range(-(-width // w))])
                                                      for row in range(-(-height // h))])[:height, :width])
                      for k in range(8)]
            started = time.perf_counter()
            calibration = Calibration(tuple(measure_frame(f) for f in frames))
            measured = time.perf_counter()
            watched = Calibration(tuple(measure_frame(f, expected_um_per_px=BCCD_UM_PER_PX / shown, pixels=SCALE_WATCH_PIXELS)
                                        for f in frames))
            report[f"{width}x{height} shown {shown}x"] = {
                "um_per_px_x_shown": None if calibration.um_per_px is None else round(calibration.um_per_px * shown, 5),
                "vs_bccd": None if calibration.um_per_px is None else round(calibration.um_per_px * shown / BCCD_UM_PER_PX, 3),
                "ms_per_frame": round(1000 * (measured - started) / len(frames), 1),
                # The agent's scale watch: the expected size, the frame's centre only.
                "watch_vs_bccd": None if watched.um_per_px is None else round(watched.um_per_px * shown / BCCD_UM_PER_PX, 3),
                "watch_ms_per_frame": round(1000 * (time.perf_counter() - measured) / len(frames), 1)}
    return report


def _crowded(bccd: Path) -> dict:
    """BCCD's first 60 frames (crowded with overlapping red cells) measured alone and tiled into 8 1080p frames,
    edge to edge and with 8 px of their own background between them: edge to edge, a tile's cut red cells join
    the next tile's into blobs no film holds."""
    import cv2

    sources = [read_rgb(p) for p in sorted((bccd / "JPEGImages").glob("*.jpg"))[:60]]
    spaced = [cv2.copyMakeBorder(s, 8, 8, 8, 8, cv2.BORDER_CONSTANT,
                                 value=[int(v) for v in np.percentile(s.reshape(-1, 3), 90, axis=0)]) for s in sources]
    report = {"alone_vs_bccd": round((Calibration(tuple(measure_frame(s) for s in sources)).um_per_px or 0) / BCCD_UM_PER_PX, 3)}
    for name, tiles in (("tiled_edge_to_edge", sources), ("tiled_8px_apart", spaced)):
        frames = [tiled(tiles[7 * k % 60:] + tiles[:7 * k % 60], 1920, 1080) for k in range(8)]
        watched = Calibration(tuple(measure_frame(f, expected_um_per_px=BCCD_UM_PER_PX, pixels=SCALE_WATCH_PIXELS) for f in frames))
        report[name] = {"vs_bccd": round((calibrate(frames).um_per_px or 0) / BCCD_UM_PER_PX, 3),
                        "watch_vs_bccd": round((watched.um_per_px or 0) / BCCD_UM_PER_PX, 3)}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--step", type=int, default=1, help="use every N-th PBC image (1: all)")
    args = parser.parse_args()
    started = time.perf_counter()
    pbc = sorted(p for p in (args.data / "pbc-normal").glob("*/*.jpg") if not p.name.startswith("."))[::args.step]
    bccd = sorted((args.data / "bccd" / "JPEGImages").glob("*.jpg"))[::18]
    report = {"pbc": _report(pbc), "bccd": _report(bccd),
              "magnification": _magnifications(args.data / "bccd"), "crowded": _crowded(args.data / "bccd"), "seconds": 0.0}
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
