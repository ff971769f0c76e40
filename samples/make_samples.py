"""Regenerate the bundled sample frames from the shared data (run from the repository root).

    python samples/make_samples.py [--data ../shared/data]

* ``frames/bccd_*.jpg``: real bright-field smear frames from BCCD (MIT licence), unchanged.
* ``frames/composed_*.jpg``: real C-NMC cells (CC BY 3.0), each cut out along its own
  segmentation (the dataset's black background removed) and placed on a white-cell-free BCCD
  frame, so the demo has frames with known ALL/normal cells. ``frames/labels.csv`` lists each
  placed cell: frame, bbox, label and source file. Cells are picked by a fixed rule (every
  k-th file of each class), not by how the model scores them.
* ``frames/leukoscope-scale.json``: the frames' scale. BCCD frames measure 0.083 µm per pixel on
  their red cells (`edge calibrate`); C-NMC cells are resized from C-NMC's reference scale to that,
  so every cell in every frame has its true physical size.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np

from trainer.dataset import CNMC_UM_PER_PX, SCALE_FILE

HERE = Path(__file__).resolve().parent
BCCD_FRAMES = ("BloodImage_00000.jpg", "BloodImage_00010.jpg", "BloodImage_00023.jpg")
BACKGROUNDS = ("BloodImage_00133.jpg", "BloodImage_00135.jpg", "BloodImage_00228.jpg")  # no white cell, least stain
#: BCCD's scale, measured on its red cells by `edge calibrate` (median of 364 frames).
FRAME_UM_PER_PX = 0.083
CELL_SCALE = CNMC_UM_PER_PX / FRAME_UM_PER_PX  # C-NMC pixels to frame pixels: true physical size


def cells(data: Path, label: str, count: int, step: int) -> list[Path]:
    files = sorted((data / "cnmc-dev" / label).glob("*.png"))
    return files[step // 2::step][:count]


def compose(background: np.ndarray, picks: list[tuple[Path, str]], rng: np.random.Generator):
    canvas = background.copy()
    height, width = canvas.shape[:2]
    slots = [(int(width * fx), int(height * fy)) for fx, fy in ((0.22, 0.3), (0.72, 0.3), (0.47, 0.72))]
    placed = []
    for (path, label), (cx, cy) in zip(picks, slots):
        cell = cv2.imread(str(path))
        cell = cv2.resize(cell, None, fx=CELL_SCALE, fy=CELL_SCALE, interpolation=cv2.INTER_AREA)
        mask = (cell.max(axis=2) > 12).astype(np.uint8)
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((5, 5), np.uint8))
        ys, xs = np.nonzero(mask)  # keep the cell and a margin for the soft edge, not the whole black field
        top, left = max(0, ys.min() - 6), max(0, xs.min() - 6)
        cell, mask = cell[top:ys.max() + 7, left:xs.max() + 7], mask[top:ys.max() + 7, left:xs.max() + 7]
        soft = cv2.GaussianBlur(mask.astype(np.float32), (7, 7), 0)[..., None]
        ys, xs = np.nonzero(mask)
        y0, x0 = cy - cell.shape[0] // 2 + int(rng.integers(-10, 11)), cx - cell.shape[1] // 2 + int(rng.integers(-10, 11))
        region = canvas[y0:y0 + cell.shape[0], x0:x0 + cell.shape[1]].astype(np.float32)
        canvas[y0:y0 + cell.shape[0], x0:x0 + cell.shape[1]] = (soft * cell + (1 - soft) * region).astype(np.uint8)
        placed.append((x0 + int(xs.min()), y0 + int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1, label, path.name))
    return canvas, placed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data")
    args = parser.parse_args()
    out = HERE / "frames"
    out.mkdir(exist_ok=True)
    for name in BCCD_FRAMES:
        shutil.copyfile(args.data / "bccd" / "JPEGImages" / name, out / f"bccd_{name}")
    blasts = cells(args.data, "all", 5, 300)
    normals = cells(args.data, "hem", 4, 150)
    plans = [[(blasts[0], "all"), (blasts[1], "all"), (blasts[2], "all")],
             [(normals[0], "hem"), (normals[1], "hem"), (normals[2], "hem")],
             [(blasts[3], "all"), (normals[3], "hem"), (blasts[4], "all")]]
    rng = np.random.default_rng(2019)
    rows = []
    for number, (background, plan) in enumerate(zip(BACKGROUNDS, plans), start=1):
        frame, placed = compose(cv2.imread(str(args.data / "bccd" / "JPEGImages" / background)), plan, rng)
        name = f"composed_{number:02d}.jpg"
        cv2.imwrite(str(out / name), frame, [cv2.IMWRITE_JPEG_QUALITY, 90])
        rows += [(name, *cell) for cell in placed]
    with (out / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["frame", "x", "y", "width", "height", "label", "cnmc_file"])
        writer.writerows(rows)
    (out / SCALE_FILE).write_text(json.dumps({"um_per_px": FRAME_UM_PER_PX,
                                              "how": "BCCD red cells, `edge calibrate`; composed cells resized to match"}) + "\n")
    print(f"wrote {len(BCCD_FRAMES)} BCCD frames and {len(plans)} composed frames ({len(rows)} cells) to {out}")


if __name__ == "__main__":
    main()
