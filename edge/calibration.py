"""The microscope's scale, measured on the red cells every smear is full of.

Why red cells: a normal red cell is a disc about 7.5 µm across in a dried film (7.5-8 µm; spread
of a healthy population ~ 5%), whatever the objective, camera, binning or crop. The median
diameter of a few dozen clean, isolated red cells gives µm per pixel to a few percent, with no
stage micrometer. Everything downstream (segmentation sizes, the model's µm crop contract) reads
this one number.

Touching red cells merge into chains; the largest circle inscribed in each region is still one
cell, so chains count too. A pale centre (central pallor) is filled before measuring.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from edge.errors import UserError

#: Mean red-cell diameter in a dried, stained blood film (textbook 7.5-8 µm; the value every
#: scale in leukoscope is relative to, including the training crops').
RED_CELL_DIAMETER_UM = 7.5
#: Fewer clean red cells than this in a frame gives no estimate for that frame.
MIN_RED_CELLS_PER_FRAME = 3
#: Plausible scales: a 4x objective on a small sensor is ~2 µm/px; 100x with a fine sensor ~0.03.
MIN_UM_PER_PX, MAX_UM_PER_PX = 0.01, 5.0


@dataclass(frozen=True)
class FrameScale:
    """Red cells measured in one frame."""

    diameters_px: tuple[float, ...]

    @property
    def count(self) -> int:
        return len(self.diameters_px)

    @property
    def median_px(self) -> float | None:
        return float(np.median(self.diameters_px)) if self.diameters_px else None

    @property
    def um_per_px(self) -> float | None:
        median = self.median_px
        return RED_CELL_DIAMETER_UM / median if median and self.count >= MIN_RED_CELLS_PER_FRAME else None


def _red_cell_mask(rgb: np.ndarray) -> np.ndarray:
    """Red cells are darker than the background in green (haemoglobin absorbs it) and are not
    the blue-violet of nuclei. Otsu on the green of non-nucleus pixels splits red cells from the
    bright background; enclosed holes (central pallor) are filled."""
    red, blue = rgb[..., 0].astype(np.int16), rgb[..., 2].astype(np.int16)
    green = cv2.GaussianBlur(rgb[..., 1], (5, 5), 0)
    nucleus = (blue - red) > 30
    others = green[~nucleus]
    if others.size < 100:
        return np.zeros(green.shape, np.uint8)
    level, _ = cv2.threshold(others.reshape(1, -1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    mask = ((green < level) & ~nucleus).astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = np.zeros_like(mask)
    cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
    return filled


def measure_frame(frame_rgb: np.ndarray, *, max_side: int = 800) -> FrameScale:
    """Diameters (frame pixels) of the red cells in one RGB frame.

    Each red-cell region's largest inscribed circle (the peak of its distance transform) is one
    cell's radius whether the cell lies alone or in a chain of touching cells, where an area or
    outline measure would see one big blob."""
    if frame_rgb is None or frame_rgb.ndim != 3 or frame_rgb.size == 0:
        raise UserError("empty frame: the camera or file delivered no pixels; check the source")
    height, width = frame_rgb.shape[:2]
    scale = min(1.0, max_side / max(height, width))
    small = cv2.resize(frame_rgb, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA) \
        if scale < 1 else frame_rgb
    if float(small.std()) < 2.0:
        return FrameScale(())  # a blank or black frame holds no cells
    mask = _red_cell_mask(small)
    # Pad with background so cells touching the frame edge are measured from their inside only.
    distance = cv2.distanceTransform(cv2.copyMakeBorder(mask, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0),
                                     cv2.DIST_L2, 5)[1:-1, 1:-1]
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    h, w = mask.shape
    diameters, areas = [], []
    for index in range(1, count):
        x, y, bw, bh, area = (int(v) for v in stats[index])
        if area < 40:
            continue
        inside = np.where(labels[y:y + bh, x:x + bw] == index, distance[y:y + bh, x:x + bw], 0)
        py, px = np.unravel_index(int(np.argmax(inside)), inside.shape)
        radius = float(inside[py, px])
        px, py = px + x, py + y
        if min(px, py, w - 1 - px, h - 1 - py) <= radius + 1:
            continue  # the inscribed circle is cut by the frame edge: the cell may be larger
        diameters.append((2.0 * radius + 1.0) / scale)
        areas.append(area)
    if len(diameters) < MIN_RED_CELLS_PER_FRAME:
        return FrameScale(tuple(diameters))
    # Platelets, specks and fragments give small circles: the area-weighted median is a red cell's
    # size, and only regions near it count.
    order = np.argsort(diameters)
    cumulative = np.cumsum(np.asarray(areas, float)[order])
    typical = diameters[order[int(np.searchsorted(cumulative, cumulative[-1] / 2))]]
    return FrameScale(tuple(d for d in diameters if 0.75 * typical <= d <= 1.3 * typical))


@dataclass(frozen=True)
class Calibration:
    """The scale of a microscope from several frames: per-frame estimates and their spread."""

    frames: tuple[FrameScale, ...]

    @property
    def usable(self) -> list[float]:
        return [f.um_per_px for f in self.frames if f.um_per_px is not None]

    @property
    def um_per_px(self) -> float | None:
        usable = self.usable
        return float(np.median(usable)) if usable else None

    @property
    def cv(self) -> float | None:
        """Coefficient of variation of the per-frame estimates (spread between frames)."""
        usable = self.usable
        if len(usable) < 2:
            return None
        return float(np.std(usable) / np.mean(usable))

    @property
    def red_cells(self) -> int:
        return sum(f.count for f in self.frames)


def calibrate(frames: list[np.ndarray]) -> Calibration:
    """Measure every frame; the estimate is the median of the per-frame scales."""
    return Calibration(tuple(measure_frame(f) for f in frames))


def check_scale(um_per_px: float, what: str) -> float:
    """A configured or declared scale must be plausible; one line naming ``what`` otherwise."""
    if not MIN_UM_PER_PX <= um_per_px <= MAX_UM_PER_PX:
        raise UserError(
            f"{what} = {um_per_px} µm per pixel is outside {MIN_UM_PER_PX}-{MAX_UM_PER_PX}; measure it with "
            "`edge calibrate` (red cells are ~7.5 µm) and set that value"
        )
    return um_per_px
