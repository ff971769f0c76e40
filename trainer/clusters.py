"""Touching white cells composed from real cells on a real smear, with every cell's outline known.

Why: real leukaemic smears with each touching cell outlined do not exist in ../shared, but real
cells with their masks (C-NMC cut out on black; PBC cells found by the device's own segmentation)
and real smear fields do. A cell is resampled from its source's µm per pixel to the field's, so a
composed frame is what a microscope at that scale would show, and which cell owns each pixel is
known. The cell splitter (``trainer splitter``) learns from such frames; ``tests/composing.py`` and
``benchmarks/bench_clusters.py`` measure the device on them, on other cells and another lab's fields.

Cells are shared out by a hash of the file name (``half``): the splitter trains on half 0 and is
measured on half 1, so a measured cluster never holds a cell the splitter saw.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

from edge.preprocessing import read_rgb
from edge.segmentation import SegmentationSettings, find_cells

#: C-NMC crops show the cell on black: pixels brighter than this in some channel are the cell.
CNMC_BLACK_LEVEL = 12
#: A bright, empty smear field's level: a cell's colour over it is the share of light the cell lets through.
PAPER = 240.0
#: Most a placed cell overlaps the one it touches, as a fraction of the two radii.
MAX_OVERLAP = 0.2


class CutCell(NamedTuple):
    rgb: np.ndarray  # the cell's box
    mask: np.ndarray  # bool, the cell's own pixels in that box


def half(path: Path) -> int:
    """0 or 1, fixed by the file name: the splitter trains on 0 and is measured on 1."""
    return int(hashlib.sha256(path.name.encode()).hexdigest()[:8], 16) % 2


def cut_cnmc(path: Path, source_um_per_px: float, um_per_px: float) -> CutCell:
    """A C-NMC cell cut along its own outline (it lies on black), at ``um_per_px``."""
    image = read_rgb(path)
    mask = image.max(axis=2) > CNMC_BLACK_LEVEL
    ys, xs = np.nonzero(mask)
    image, mask = image[ys.min():ys.max() + 1, xs.min():xs.max() + 1], mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    return _rescale(image, mask, source_um_per_px / um_per_px)


def cut_smear_cell(path: Path, source_um_per_px: float, um_per_px: float) -> CutCell | None:
    """The white cell nearest the centre of a single-cell smear image (PBC), outlined by the device's
    own segmentation, at ``um_per_px``; None where none is found."""
    image = read_rgb(path)
    cells = find_cells(image, SegmentationSettings(um_per_px=source_um_per_px))
    if not cells:
        return None
    centre = np.array(image.shape[1::-1]) / 2
    cell = min(cells, key=lambda c: np.linalg.norm(np.array(c.bbox[:2]) + np.array(c.bbox[2:]) / 2 - centre))
    x, y, w, h = cell.bbox
    return _rescale(image[y:y + h, x:x + w], cell.mask, source_um_per_px / um_per_px)


def _rescale(rgb: np.ndarray, mask: np.ndarray, factor: float) -> CutCell:
    """The cell at the new scale, its box cut to its own pixels: the box a pasted cell reports is where
    it shows, not the device's hull-and-rim box it was cut from (on PBC cells ~40% larger in area)."""
    rgb = cv2.resize(rgb, None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA)
    mask = cv2.resize(mask.astype(np.uint8), (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_NEAREST).astype(bool)
    x, y, w, h = cv2.boundingRect(mask.view(np.uint8))
    return CutCell(rgb[y:y + h, x:x + w], mask[y:y + h, x:x + w]) if w else CutCell(rgb, mask)


def paste(frame: np.ndarray, cell: CutCell | tuple[np.ndarray, np.ndarray], centre: tuple[int, int], owner: np.ndarray | None = None,
          label: int = 0, absorb: bool = False) -> tuple[int, int, int, int]:
    """Put a cell's own pixels on ``frame`` (in place), centred at ``centre``; its box (x, y, w, h).
    ``owner`` (frame-sized, int) gets ``label`` where the cell now shows: a later cell covers an earlier one.
    ``absorb``: the cell filters the light instead of replacing it (each pixel times the cell's
    transmission, its colour over ``PAPER``), as light through two stacked cells does: no pasted edge,
    the lower cell still seen through the upper one."""
    rgb, mask = cell
    h, w = mask.shape
    x, y = int(centre[0] - w / 2), int(centre[1] - h / 2)
    region = frame[y:y + h, x:x + w]
    if absorb:
        transmission = np.clip(rgb[mask].astype(np.float32) / PAPER, 0, 1)
        region[mask] = (region[mask].astype(np.float32) * transmission).round().astype(np.uint8)
    else:
        region[mask] = rgb[mask]
    if owner is not None:
        owner[y:y + h, x:x + w][mask] = label
    return x, y, w, h


def place_cluster(rng: np.random.Generator, cells: list, frame: np.ndarray, owner: np.ndarray | None = None,
                  absorb: bool = False, placements: list | None = None) -> list[tuple[int, int, int, int]]:
    """Cells placed one by one on ``frame`` (in place), each touching an earlier one and overlapping it
    by 0-20% of their radii; the placed cells' boxes. ``owner`` gets label k + 1 for the k-th placed cell;
    ``absorb``: see ``paste``. ``placements`` gets (cell, centre) of each placed cell, in the boxes' order.
    A cell that finds no place (after 200 tries) is left out."""
    height, width = frame.shape[:2]
    placed: list[tuple[float, float, float]] = []
    boxes = []
    for cell in cells:
        radius = float(np.sqrt(cell[1].sum() / np.pi))
        for _ in range(200):
            if placed:
                ox, oy, other = placed[rng.integers(len(placed))]
                angle, gap = rng.uniform(0, 2 * np.pi), (radius + other) * (1 - rng.uniform(0, MAX_OVERLAP))
                cx, cy = ox + gap * np.cos(angle), oy + gap * np.sin(angle)
            else:
                cx, cy = width / 2, height / 2
            h, w = cell[1].shape  # the whole box must fit, as ``paste`` puts it (an oblong cell's exceeds its radius)
            x, y = int(int(cx) - w / 2), int(int(cy) - h / 2)
            inside = radius + 5 < cx < width - radius - 5 and radius + 5 < cy < height - radius - 5 \
                and x >= 0 and y >= 0 and x + w <= width and y + h <= height
            if inside and all(np.hypot(cx - px, cy - py) >= 0.8 * (radius + pr) for px, py, pr in placed):
                placed.append((cx, cy, radius))
                boxes.append(paste(frame, cell, (int(cx), int(cy)), owner, len(boxes) + 1, absorb))
                if placements is not None:
                    placements.append((cell, (int(cx), int(cy))))
                break
    return boxes


def inner_distance(owner: np.ndarray) -> np.ndarray:
    """The splitter's target (``edge.splitter.CONTRACT``): in each cell's *territory*, the distance to
    the territory's edge divided by its largest (1 at the cell's centre, falling to 0 at its edge and
    wherever it meets another cell); 0 outside white cells.

    A cell's territory is its visible pixels' convex hull, less what other cells show. Why the hull: a
    segmented nucleus (neutrophil, eosinophil) is lobes joined by thin filaments, and a distance taken
    in its pixels alone peaks once per lobe, so the target itself said "several cells" and the device
    split it; its hull peaks once, between the lobes. A round or a partly hidden cell keeps its pixels."""
    target = np.zeros(owner.shape, np.float32)
    for label in range(1, int(owner.max()) + 1):
        region = (owner == label).astype(np.uint8)
        points = cv2.findNonZero(region)
        if points is None:
            continue
        territory = np.zeros_like(region)
        cv2.fillConvexPoly(territory, cv2.convexHull(points), 1)
        territory[(owner > 0) & (owner != label)] = 0
        territory |= region
        distance = cv2.distanceTransform(territory, cv2.DIST_L2, 5)
        np.maximum(target, distance / max(float(distance.max()), 1e-6), out=target)
    return target


def box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over union of two (x, y, w, h) boxes."""
    w = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    h = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return w * h / (a[2] * a[3] + b[2] * b[3] - w * h)


def matches(placed: list, found: list) -> dict[int, int]:
    """Placed box index -> found box index, one to one, where the (x, y, w, h) boxes overlap with IoU >= 0.5:
    how a composed cluster's cells count as found each on its own."""
    pairs: dict[int, int] = {}
    for k, box in enumerate(placed):
        best = max(((box_iou(box, other), i) for i, other in enumerate(found) if i not in pairs.values()), default=(0.0, -1))
        if best[0] >= 0.5:
            pairs[k] = best[1]
    return pairs
