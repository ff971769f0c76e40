"""Frames composed from real cells on real smear backgrounds, at one physical scale.

Why: real leukaemic smears with every cell outlined do not exist in ../shared, but real cells with
their masks (C-NMC cut out on black; PBC cells segmented on their own smear) and real white-cell-free
BCCD smear fields do. A cell is resampled from its source's µm per pixel to the background's, so a
composed frame is what a microscope at that scale would show, and where each cell is, is known.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from trainer.dataset import CNMC_UM_PER_PX
from edge.preprocessing import read_rgb
from edge.segmentation import SegmentationSettings, find_cells
from tests.conftest import BCCD, CNMC, SHARED_DATA

PBC = SHARED_DATA / "pbc-normal"
#: Measured by `edge calibrate` on the images themselves (red cells; see tests/test_calibration.py).
BCCD_UM_PER_PX = 0.083
PBC_UM_PER_PX = 0.102
#: Quarter-frame tiles of real BCCD smear, 320x240 (every BCCD frame, even those annotated with none,
#: shows a white cell somewhere, so whole frames cannot serve as empty fields).
TILE = (320, 240)


def _empty_tiles(limit: int = 24) -> list[np.ndarray]:
    """Quarters of BCCD frames in which the device's own segmentation finds no white cell."""
    tiles = []
    for path in sorted((BCCD / "JPEGImages").glob("*.jpg"))[::7]:
        frame = read_rgb(path)
        for y in (0, TILE[1]):
            for x in (0, TILE[0]):
                tile = frame[y:y + TILE[1], x:x + TILE[0]]
                stained = (tile[..., 2].astype(int) - tile[..., 0] > 35).mean()
                if stained < 0.002 and not find_cells(tile, SegmentationSettings(um_per_px=BCCD_UM_PER_PX)):
                    tiles.append(tile)
        if len(tiles) >= limit:
            return tiles
    return tiles


_TILES: list[np.ndarray] = []


def background(index: int, columns: int = 4, rows: int = 4) -> np.ndarray:
    """A real smear field without white cells, ``columns`` x ``rows`` tiles (1280x960 by default)."""
    if not _TILES:
        _TILES.extend(_empty_tiles())
    picks = [_TILES[(index * 7 + k) % len(_TILES)] for k in range(columns * rows)]
    return np.vstack([np.hstack(picks[r * columns:(r + 1) * columns]) for r in range(rows)]).copy()


def cnmc_cell(path: Path, um_per_px: float = BCCD_UM_PER_PX) -> tuple[np.ndarray, np.ndarray]:
    """(RGB, bool mask) of one C-NMC cell, cut along its own outline, at ``um_per_px``."""
    image = read_rgb(path)
    mask = image.max(axis=2) > 12
    ys, xs = np.nonzero(mask)
    image, mask = image[ys.min():ys.max() + 1, xs.min():xs.max() + 1], mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    factor = CNMC_UM_PER_PX / um_per_px
    image = cv2.resize(image, None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA)
    mask = cv2.resize(mask.astype(np.uint8), (image.shape[1], image.shape[0]), interpolation=cv2.INTER_NEAREST).astype(bool)
    return image, mask


def pbc_cell(path: Path, um_per_px: float = BCCD_UM_PER_PX) -> tuple[np.ndarray, np.ndarray] | None:
    """(RGB, bool mask) of the centred PBC cell, segmented by the device's own code, at ``um_per_px``."""
    image = read_rgb(path)
    cells = find_cells(image, SegmentationSettings(um_per_px=PBC_UM_PER_PX))
    if not cells:
        return None
    centre = np.array(image.shape[1::-1]) / 2
    cell = min(cells, key=lambda c: np.linalg.norm(np.array(c.bbox[:2]) + np.array(c.bbox[2:]) / 2 - centre))
    x, y, w, h = cell.bbox
    factor = PBC_UM_PER_PX / um_per_px
    crop = cv2.resize(image[y:y + h, x:x + w], None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA)
    mask = cv2.resize(cell.mask.astype(np.uint8), (crop.shape[1], crop.shape[0]), interpolation=cv2.INTER_NEAREST).astype(bool)
    return crop, mask


def paste(frame: np.ndarray, cell: tuple[np.ndarray, np.ndarray], centre: tuple[int, int]) -> tuple[int, int, int, int]:
    """Put a cell's masked pixels on ``frame`` (in place) centred at ``centre``; its box (x, y, w, h)."""
    rgb, mask = cell
    h, w = mask.shape
    x, y = int(centre[0] - w / 2), int(centre[1] - h / 2)
    region = frame[y:y + h, x:x + w]
    region[mask] = rgb[mask]
    return x, y, w, h


def cnmc_files(step: int = 40) -> list[Path]:
    return sorted((CNMC / "all").glob("*.png"))[::step] + sorted((CNMC / "hem").glob("*.png"))[::step]


def pbc_files(step: int = 200) -> list[Path]:
    return sorted(PBC.glob("*/*.jpg"))[::step]


def box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over union of two (x, y, w, h) boxes."""
    w = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    h = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return w * h / (a[2] * a[3] + b[2] * b[3] - w * h)


def place_cluster(rng: np.random.Generator, cells: list, index: int) -> tuple[np.ndarray, list]:
    """Cells placed one by one touching an earlier one, overlapping it by 0-20% of their radii, on
    background ``index``; (frame, the cells' boxes)."""
    frame = background(index)
    height, width = frame.shape[:2]
    placed, boxes = [], []
    for cell in cells:
        radius = float(np.sqrt(cell[1].sum() / np.pi))
        for _ in range(200):
            if placed:
                ox, oy, other = placed[rng.integers(len(placed))]
                angle, gap = rng.uniform(0, 2 * np.pi), (radius + other) * (1 - rng.uniform(0, 0.2))
                cx, cy = ox + gap * np.cos(angle), oy + gap * np.sin(angle)
            else:
                cx, cy = width / 2, height / 2
            h, w = cell[1].shape  # the whole crop must fit, as ``paste`` puts it (an oblong cell's exceeds its radius)
            x, y = int(int(cx) - w / 2), int(int(cy) - h / 2)
            inside = radius + 5 < cx < width - radius - 5 and radius + 5 < cy < height - radius - 5 \
                and x >= 0 and y >= 0 and x + w <= width and y + h <= height
            if inside and all(np.hypot(cx - px, cy - py) >= 0.8 * (radius + pr) for px, py, pr in placed):
                placed.append((cx, cy, radius))
                boxes.append(paste(frame, cell, (int(cx), int(cy))))
                break
    return frame, boxes


def cluster(rng: np.random.Generator, size: int, index: int) -> tuple[np.ndarray, list]:
    """A cluster of ``size`` real cells (C-NMC blasts and normals, PBC normals, half and half) on a real
    smear field; (frame, boxes). A cell that could not be placed touching the others is left out."""
    cnmc, pbc = _FILES.setdefault("cnmc", cnmc_files(25)), _FILES.setdefault("pbc", pbc_files(97))
    cells: list = []
    while len(cells) < size:
        cell = cnmc_cell(cnmc[rng.integers(len(cnmc))]) if rng.random() < 0.5 else pbc_cell(pbc[rng.integers(len(pbc))])
        if cell is not None:
            cells.append(cell)
    return place_cluster(rng, cells, index)


_FILES: dict[str, list[Path]] = {}


def found_alone(boxes: list, found: list) -> int:
    """How many of the placed cells' boxes are matched one-to-one by a found cell's box (IoU >= 0.5)."""
    used: set[int] = set()
    hits = 0
    for box in boxes:
        best = max(((box_iou(box, cell.bbox), i) for i, cell in enumerate(found) if i not in used), default=(0.0, -1))
        if best[0] >= 0.5:
            used.add(best[1])
            hits += 1
    return hits
