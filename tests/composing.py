"""Frames composed from real cells on real BCCD smear fields, at BCCD's scale, to measure the device.

How cells are cut and placed is ``trainer.clusters`` (the cell splitter learns from the same kind of
frames, on PBC fields and the other half of the cells). Here: BCCD fields (a lab neither the
classifier nor the splitter trained on), the measured cells' half, and the matching of found cells.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trainer import clusters
from trainer.clusters import CutCell, box_iou, cut_cnmc, cut_smear_cell, paste  # noqa: F401  (the tests' own frames)
from trainer.crosslab import BCCD_UM_PER_PX  # noqa: F401  (the tests' scale of BCCD's frames)
from trainer.dataset import CNMC_UM_PER_PX
from edge.preprocessing import read_rgb
from edge.segmentation import SegmentationSettings, find_cells
from tests.conftest import BCCD, CNMC, SHARED_DATA

PBC = SHARED_DATA / "pbc-normal"
#: Measured by `edge calibrate` on the images themselves (red cells; see tests/test_calibration.py).
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


def cnmc_cell(path: Path, um_per_px: float = BCCD_UM_PER_PX) -> CutCell:
    """(RGB, bool mask) of one C-NMC cell, cut along its own outline, at ``um_per_px``."""
    return cut_cnmc(path, CNMC_UM_PER_PX, um_per_px)


def pbc_cell(path: Path, um_per_px: float = BCCD_UM_PER_PX) -> CutCell | None:
    """(RGB, bool mask) of the centred PBC cell, segmented by the device's own code, at ``um_per_px``."""
    return cut_smear_cell(path, PBC_UM_PER_PX, um_per_px)


def cnmc_files(step: int = 40) -> list[Path]:
    return sorted((CNMC / "all").glob("*.png"))[::step] + sorted((CNMC / "hem").glob("*.png"))[::step]


def pbc_files(step: int = 200) -> list[Path]:
    return sorted(PBC.glob("*/*.jpg"))[::step]


def place_cluster(rng: np.random.Generator, cells: list, index: int, absorb: bool = False,
                  placements: list | None = None) -> tuple[np.ndarray, list]:
    """Cells placed touching each other (``trainer.clusters.place_cluster``) on background ``index``; (frame, boxes)."""
    frame = background(index)
    return frame, clusters.place_cluster(rng, cells, frame, absorb=absorb, placements=placements)


def use_pool(cnmc_step: int = 25, pbc_step: int = 97) -> None:
    """Draw ``cluster``'s cells from every ``cnmc_step``-th C-NMC and ``pbc_step``-th PBC image, of the half
    the shipped splitter never saw (``trainer.clusters.half``). Which cells are drawn moves the classical
    split's rate a lot (0.56-0.73 over 28 clusters from three pools), so methods are compared on the same frames."""
    _FILES["cnmc"] = [p for p in cnmc_files(cnmc_step) if clusters.half(p) == 1]
    _FILES["pbc"] = [p for p in pbc_files(pbc_step) if clusters.half(p) == 1]


def kind(path: Path) -> str:
    """What a cell is: "C-NMC all" / "C-NMC hem" (its class folder), or "PBC <cell type>"."""
    return f"C-NMC {path.parent.name}" if path.suffix == ".png" else f"PBC {path.parent.name}"


def cluster(rng: np.random.Generator, size: int, index: int, absorb: bool = False,
            placements: list | None = None, kinds: list | None = None) -> tuple[np.ndarray, list]:
    """A cluster of ``size`` real cells (C-NMC blasts and normals, PBC normals, half and half) on a real
    smear field; (frame, boxes). A cell that could not be placed touching the others is left out.
    ``kinds`` gets each placed cell's ``kind``, in the boxes' order."""
    cells: list = []
    sources: dict[int, Path] = {}
    while len(cells) < size:
        cell, path = random_cell(rng)
        cells.append(cell)
        sources[id(cell)] = path
    placed = [] if placements is None else placements
    frame, boxes = place_cluster(rng, cells, index, absorb, placed)
    if kinds is not None:
        kinds.extend(kind(sources[id(cell)]) for cell, _ in placed)
    return frame, boxes


def random_cell(rng: np.random.Generator) -> tuple[CutCell, Path]:
    """One cell of the pool (``use_pool``), C-NMC or PBC at even odds, and its file."""
    if not _FILES:
        use_pool()
    while True:
        files = _FILES["cnmc"] if rng.random() < 0.5 else _FILES["pbc"]
        path = files[rng.integers(len(files))]
        cell = cnmc_cell(path) if path.suffix == ".png" else pbc_cell(path)
        if cell is not None:
            return cell, path


_FILES: dict[str, list[Path]] = {}


def matches(boxes: list, found: list) -> dict[int, int]:
    """Placed cell index -> found cell index (``trainer.clusters.matches`` on the found cells' boxes)."""
    return clusters.matches(boxes, [cell.bbox for cell in found])


def found_alone(boxes: list, found: list) -> int:
    """How many of the placed cells' boxes are matched one-to-one by a found cell's box (IoU >= 0.5)."""
    return len(matches(boxes, found))
