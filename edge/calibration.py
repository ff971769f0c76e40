"""The microscope's scale, measured on the red cells every smear is full of.

Why red cells: a normal red cell is a disc about 7.5 µm across in a dried film (7.5-8 µm; spread
of a healthy population ~ 5%), whatever the objective, camera, binning or crop. The median
diameter of a few dozen clean, isolated red cells gives µm per pixel to a few percent, with no
stage micrometer. Everything downstream (segmentation sizes, the model's µm crop contract) reads
this one number.

Lone round red cells set each frame's size (a pale centre, central pallor, is filled before
measuring), and among them the discocytes: cells that show their central pallor are flat biconcave
discs lying in the film's monolayer, the cells the textbook size describes. Cells without it are
spread thin at the film's tail (larger) or sit in its thick part: on BCCD, frames measured on them
spread 22% between frames, frames of discocytes 4.8%. Touching red cells merge into chains, whose largest inscribed circle is still about one
cell: they top up a frame with few lone cells, and measure a film crowded everywhere; where enough
frames have lone cells, frames of chains alone are left out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import cv2
import numpy as np

from edge.errors import DataError, UserError
from edge.gate import look_at
from edge.preprocessing import DEFAULT_CONTRACT
from edge.segmentation import SegmentationSettings, field_of_view, flattened

#: Mean red-cell diameter in a dried, stained blood film (textbook 7.5-8 µm; the value every
#: scale in leukoscope is relative to, including the training crops').
RED_CELL_DIAMETER_UM = 7.5
#: Fewer clean red cells than this in a frame gives no estimate for that frame.
MIN_RED_CELLS_PER_FRAME = 3
#: Frames with lone red cells needed before frames of touching red cells alone are left out.
MIN_LONE_FRAMES = 3
#: Plausible scales: a 4x objective on a small sensor is ~2 µm/px; 100x with a fine sensor ~0.03.
MIN_UM_PER_PX, MAX_UM_PER_PX = 0.01, 5.0
#: C-NMC's scale (training reads it, and `edge replay`'s hint for crops without one names it). Its crops
#: show no red cells, so it was derived from the cells themselves: the median equivalent diameter of C-NMC
#: normal B-cells (cnmc-dev hem, 200 cells: 183 px) was matched to that of PBC lymphocytes measured in µm
#: through their red cells (200 cells: 10.1 µm at PBC's 0.1033 µm/px from `edge calibrate`), giving
#: 10.1 / 183 = 0.0555 µm/px; both are mature lymphoid cells segmented by the same code. An estimate, good
#: to the spread of lymphocyte sizes between donors (~5-10%).
CNMC_UM_PER_PX = 0.0555
#: A folder of frames may carry its scale in this file: ``{"um_per_px": F}`` (``edge calibrate --write``).
SCALE_FILE = "leukoscope-scale.json"
#: A measured scale further than this from the configured one means the optics changed.
DRIFT_WARNING = 0.10
#: A scale stated for replayed frames (``--um-per-px``, ``SCALE_FILE``) further than this from what their
#: discocytes measure is warned about. Wider than ``DRIFT_WARNING``: a replay may hold a few frames, where
#: the agent compares the median of many.
STATED_SCALE_WARNING = 0.25
#: ... and further than this factor from what any of their red cells measure: a wrong objective or binning
#: (2-2.5x). Red cells without a central pallor spread by 22% between frames (BCCD), so nothing finer is
#: read from them: the bundled composed sample frames measure 0.061 against their true 0.083.
STATED_SCALE_FACTOR = 2.0
#: Frame problems (``gate.FRAME_PROBLEMS``) under which red cells are not measured. Frames without colour are:
#: their green is their grey.
UNMEASURABLE = ("dark", "overexposed")
#: Frames measured for that check: reading and measuring six 1080p PNG frames adds ~0.2 s to a replay (bench_pipeline.py).
STATED_SCALE_CHECK_FRAMES = 6


#: A frame scale this much coarser than the model's input is warned about (a calibration is good to a few per cent).
COARSE_TOLERANCE = 1.1


def coarse_scale(um_per_px: float, model_um_per_px: float = DEFAULT_CONTRACT.um_per_px) -> str | None:
    """One line on what a frame scale coarser than the model's input costs, or None. Why: the crop contract enlarges such
    cells to the model's scale, so they show it less detail than it was trained on, and nothing else says so."""
    if um_per_px <= COARSE_TOLERANCE * model_um_per_px:
        return None
    return (f"{um_per_px:.3g} µm per pixel is coarser than the model's {model_um_per_px:g}: cells are enlarged for it and "
            "lose detail (BCCD frames shown at 0.33 / 0.42 µm per pixel kept 0.92 / 0.80 of their white cells); use a "
            "higher-magnification objective (40x or more) or a finer camera mode")


@dataclass(frozen=True)
class FrameScale:
    """Red cells measured in one frame."""

    diameters_px: tuple[float, ...]
    #: Whether lone round red cells set the size (False: only chains of touching cells were found).
    lone: bool = True
    #: Whether lone discocytes (central pallor visible) alone set it: the most trusted frames.
    discocytes: bool = False
    #: Why the frame was not measured at all: ``gate.FRAME_PROBLEMS``' "dark" or "overexposed" (red cells washed out
    #: measure as specks: BCCD frames brightened 1.7x read 3.4x the scale), else None.
    light_problem: str | None = None

    @property
    def count(self) -> int:
        return len(self.diameters_px)

    @property
    def typical_px(self) -> float | None:
        """The mean diameter of the frame's measured red cells (already those within -25%/+30% of their
        median): with 3-8 cells a frame, the mean is steadier than the median (measured on PBC: the
        per-image spread drops by ~0.3 points)."""
        return float(np.mean(self.diameters_px)) if self.diameters_px else None

    @property
    def um_per_px(self) -> float | None:
        typical = self.typical_px
        return RED_CELL_DIAMETER_UM / typical if typical and self.count >= MIN_RED_CELLS_PER_FRAME else None


#: Blue excess (B - R) above the background's from which a pixel belongs to a white cell (nucleus
#: or pale blue cytoplasm). Red cells can be a little bluer than the background (up to ~+20 on PBC),
#: white-cell cytoplasm is more so; relative to the background, so that a lamp's cast does not matter.
WHITE_CELL_BLUE_EXCESS = 30
#: Red cells narrower than this (frame pixels) are specks (a central pallor, a granule): at that scale
#: (0.375 µm/px) a white cell is ~40 px, coarser than the model's 0.25 µm/px input, so no frame worth
#: classifying has red cells this small. (12 px let pale centres of lavender-stained cells through.)
MIN_RED_CELL_DIAMETER_PX = 20.0
#: A region whose convex hull fills this much of its enclosing circle is one red cell.
SINGLE_CELL_ROUNDNESS = 0.78
#: A lone red cell is a discocyte when its centre is brighter than its rim by this share of the rim's
#: contrast with the background (its central pallor). On PBC a quarter of lone cells show none.
DISCOCYTE_PALLOR = 0.15


def _smoothed_green(rgb: np.ndarray) -> np.ndarray:
    return cv2.GaussianBlur(rgb[..., 1], (5, 5), 0)


def _red_cell_mask(rgb: np.ndarray, green: np.ndarray | None = None) -> np.ndarray:
    """Red cells are darker than the background in green (haemoglobin absorbs it) and redder than
    blue. White cells (nucleus and cytoplasm) are left out first: a large dark nucleus would
    otherwise take Otsu's split for itself, and pale cytoplasm would join red cells around it.
    Otsu on the green of what is left splits red cells from the bright background; enclosed holes
    (central pallor) are filled. ``green``: ``_smoothed_green(rgb)``, when the caller has it already."""
    red, blue = rgb[..., 0].astype(np.int16), rgb[..., 2].astype(np.int16)
    green = _smoothed_green(rgb) if green is None else green
    excess = blue - red
    brightest = green >= np.percentile(green[::4, ::4], 80)  # the background: red cells absorb green
    field = float(np.median(excess[brightest]))
    white_cell = cv2.dilate((excess > field + WHITE_CELL_BLUE_EXCESS).astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    others = green[~white_cell]
    if others.size < 100:
        return np.zeros(green.shape, np.uint8)
    level, _ = cv2.threshold(others.reshape(1, -1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    mask = ((green < level) & ~white_cell).astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    # A pale cell's rim can be broken where the stain is thin: a small closing rejoins it.
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)))
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = np.zeros_like(mask)
    cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
    return filled


def _single_cell_diameter(contour: np.ndarray) -> float | None:
    """A lone red cell's diameter from its convex hull, or None when the region is not one round
    cell. The hull, not the region: a central pallor open to the rim (a "C" in the mask) leaves
    the hull a full disc, where the inscribed circle would measure the rim's width."""
    hull = cv2.convexHull(contour)
    hull_area = float(cv2.contourArea(hull))
    _, radius = cv2.minEnclosingCircle(hull)
    if hull_area <= 0 or hull_area < SINGLE_CELL_ROUNDNESS * np.pi * radius * radius:
        return None
    return 2.0 * float(np.sqrt(hull_area / np.pi))


def _pallor(inside: np.ndarray, green: np.ndarray, background: float) -> float:
    """How much brighter a cell's centre is than its rim, as a share of the rim's contrast with the
    background (0: evenly stained; ~0.5: a marked central pallor). ``inside`` is the cell's distance
    transform, ``green`` the same box of the frame's green."""
    radius = float(inside.max())
    centre, rim = inside > 0.6 * radius, (inside > 0) & (inside < 0.4 * radius)
    if not centre.any() or not rim.any():
        return 0.0
    rim_level = float(green[rim].mean())
    return (float(green[centre].mean()) - rim_level) / max(background - rim_level, 1.0)


#: A frame is first looked at no larger than this (its longer side, pixels): plenty where red cells are
#: large (a 100x objective), and quick.
FIRST_LOOK_SIDE = 800
#: Where red cells show smaller than ``MEASURE_AS_IS_PX`` there, the frame is looked at again resampled so
#: that they show about this many pixels across (never enlarged beyond the frame's own pixels): the size
#: PBC's and BCCD's own frames show them at (73-92 px), for which the mask's smoothing and morphology
#: (fixed 3-5 px kernels) were set. Without it, 12 MP frames at a 40x-like 0.16-0.25 µm/px read
#: 14% large and 7 times too fine (BCCD tiled and shown at 0.5x and 0.33x; bench_calibration.py).
MEASURE_RED_CELL_PX = 80.0
#: Red cells showing within this many pixels across are measured as they are (PBC, BCCD: 73-92 px).
MEASURE_AS_IS_PX = (50.0, 150.0)
#: Pixels looked at, at most, in the closer look (a 1080p frame's): the frame's centre, where the whole
#: would be larger, still holds dozens of red cells.
MEASURE_PIXELS = 640_000
#: Looks at a frame, each resampled by what the last one measured, before it is left without an estimate.
MEASURE_LOOKS = 3


def measure_frame(frame_rgb: np.ndarray, *, expected_um_per_px: float | None = None,
                  pixels: int = MEASURE_PIXELS) -> FrameScale:
    """Diameters (frame pixels) of the red cells in one RGB frame.

    The whole frame is looked at first (reduced to ``FIRST_LOOK_SIDE``). Where its red cells show
    outside ``MEASURE_AS_IS_PX``, or none are found in a reduced frame, it is looked at again resampled
    so that they show ``MEASURE_RED_CELL_PX`` across (its centre, within ``pixels``).
    A round region is one cell, measured by its hull. Any other region is a chain of touching
    cells: its largest inscribed circle (the peak of its distance transform) is still one cell's
    radius, where an area or outline measure would see one big blob.

    ``expected_um_per_px``: the scale the frame should have (a running device's configured one). Only
    the closer look is taken, on the frame's centre, unless red cells there are not within
    30% of the size expected (the optics changed): then every look is taken."""
    if frame_rgb is None or frame_rgb.ndim != 3 or frame_rgb.size == 0:
        raise UserError("empty frame: the camera or file delivered no pixels; check the source")
    light_problem = look_at(frame_rgb).problem
    if light_problem in UNMEASURABLE:
        return FrameScale((), light_problem=light_problem)
    # Seen through a round field stop: inside the circle only, as black would take Otsu's split of red cells from glass.
    field = field_of_view(frame_rgb, SegmentationSettings.black_level)
    if field is not None:
        x, y, w, h = field
        frame_rgb = frame_rgb[y:y + h, x:x + w]
    if expected_um_per_px is not None:
        expected_px = RED_CELL_DIAMETER_UM / expected_um_per_px
        zoom = min(1.0, MEASURE_RED_CELL_PX / expected_px)
        expected = _measure_at(frame_rgb, zoom, pixels)
        if expected.typical_px is not None and 0.7 <= expected.typical_px / expected_px <= 1.43:
            return expected
    height, width = frame_rgb.shape[:2]
    zoom = min(1.0, FIRST_LOOK_SIDE / max(height, width))
    measured = _measure_at(frame_rgb, zoom)
    for _ in range(MEASURE_LOOKS):
        typical = measured.typical_px
        if typical is None:
            if zoom >= 1.0:
                return measured
            zoom, measured = 1.0, _measure_at(frame_rgb, 1.0, pixels)  # red cells too small to see reduced: look closer
            continue
        # Never enlarged: specks upsampled pass for red cells (PBC: frames whose first look found only
        # specks of 22-47 px, where red cells are 73).
        wanted = min(1.0, MEASURE_RED_CELL_PX / typical)
        if MEASURE_AS_IS_PX[0] <= typical * zoom <= MEASURE_AS_IS_PX[1] or wanted == zoom:
            return measured
        closer = _measure_at(frame_rgb, wanted, pixels)
        # Resampled, the same red cells measure within a few per cent; anything else was not red cells.
        if closer.typical_px is not None and 0.8 <= closer.typical_px / typical <= 1.25:
            return closer
        zoom, measured = wanted, closer
    return FrameScale(())


def _measure_at(frame_rgb: np.ndarray, zoom: float, pixels: int = MEASURE_PIXELS) -> FrameScale:
    """``measure_frame`` on the frame resampled by ``zoom``, its centre only where that would exceed
    ``pixels``; diameters in frame pixels."""
    height, width = frame_rgb.shape[:2]
    share = min(1.0, float(np.sqrt(pixels / (zoom * zoom * height * width))))
    crop_h, crop_w = max(1, round(height * share)), max(1, round(width * share))
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    view = np.ascontiguousarray(frame_rgb[top:top + crop_h, left:left + crop_w])
    size = (max(1, round(crop_w * zoom)), max(1, round(crop_h * zoom)))
    small = view if size == (crop_w, crop_h) else \
        cv2.resize(view, size, interpolation=cv2.INTER_AREA if zoom < 1 else cv2.INTER_LINEAR)
    scale = size[0] / crop_w
    if float(small.std()) < 2.0:
        return FrameScale(())  # a blank or black frame holds no cells
    # Otsu's split of red cells from the background is frame-wide: under a lamp off-centre the dim side's bare glass
    # reads as red cells (BCCD lit off-centre to 60%: 0.280 µm/px measured against 0.082).
    small, _ = flattened(small)
    green = _smoothed_green(small)
    mask = _red_cell_mask(small, green)
    background = float(np.percentile(green[::2, ::2], 90))
    # Pad with background so cells touching the frame edge are measured from their inside only.
    distance = cv2.distanceTransform(cv2.copyMakeBorder(mask, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0),
                                     cv2.DIST_L2, 5)[1:-1, 1:-1]
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    h, w = mask.shape
    singles, chains = [], []  # (diameter in frame pixels, region area)
    discs: list[float] = []  # the singles that show a central pallor
    for index in range(1, count):
        x, y, bw, bh, area = (int(v) for v in stats[index])
        if area < 40:
            continue
        region = labels[y:y + bh, x:x + bw] == index
        inside = np.where(region, distance[y:y + bh, x:x + bw], 0)
        if x > 0 and y > 0 and x + bw < w and y + bh < h:
            contours, _ = cv2.findContours(region.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            single = _single_cell_diameter(max(contours, key=cv2.contourArea))
            if single is not None:
                singles.append((single / scale, area))
                if _pallor(inside, green[y:y + bh, x:x + bw], background) >= DISCOCYTE_PALLOR:
                    discs.append(single / scale)
                continue
        py, px = np.unravel_index(int(np.argmax(inside)), inside.shape)
        radius = float(inside[py, px])
        px, py = px + x, py + y
        if min(px, py, w - 1 - px, h - 1 - py) <= radius + 1:
            continue  # the inscribed circle is cut by the frame edge: the cell may be larger
        chains.append(((2.0 * radius + 1.0) / scale, area))
    # Lone round cells are measured whole; chains (and white-cell granules or fragments mistaken for
    # them) only through an inscribed circle. So lone cells, where there are any, set the typical
    # size; otherwise the area-weighted median of the chains' circles does (platelets, specks and
    # fragments give small circles of little area), and the frame is marked as measured without
    # lone cells (``Calibration`` leaves such frames out when enough others have lone cells). Only
    # regions near the typical size count.
    singles = [(d, a) for d, a in singles if d >= MIN_RED_CELL_DIAMETER_PX]
    chains = [(d, a) for d, a in chains if d >= MIN_RED_CELL_DIAMETER_PX]
    discs = [d for d in discs if d >= MIN_RED_CELL_DIAMETER_PX]
    if len(discs) >= MIN_RED_CELLS_PER_FRAME:
        typical = float(np.median(discs))
        near = _near(discs, typical)
        if len(near) >= MIN_RED_CELLS_PER_FRAME:
            return FrameScale(near, lone=True, discocytes=True)
    if singles:
        typical = float(np.median([d for d, _ in singles]))
        measured = singles if len(singles) >= MIN_RED_CELLS_PER_FRAME else singles + chains
    elif chains:
        diameters = np.array([d for d, _ in chains])
        order = np.argsort(diameters)
        cumulative = np.cumsum(np.array([a for _, a in chains], float)[order])
        typical = float(diameters[order[int(np.searchsorted(cumulative, cumulative[-1] / 2))]])
        measured = chains
    else:
        return FrameScale(())
    return FrameScale(_near([d for d, _ in measured], typical), lone=bool(singles))


def _near(diameters: list[float], typical: float) -> tuple[float, ...]:
    """The diameters within -25% / +30% of the frame's typical red cell: the rest are fragments,
    platelets, pairs or white-cell parts."""
    return tuple(float(d) for d in diameters if 0.75 * typical <= d <= 1.3 * typical)


@dataclass(frozen=True)
class Calibration:
    """The scale of a microscope from several frames: per-frame estimates and their spread."""

    frames: tuple[FrameScale, ...]

    @property
    def usable(self) -> list[float]:
        """Per-frame scales of the ``kept`` frames."""
        return [f.um_per_px for f in self.kept]  # type: ignore[misc]

    @property
    def kept(self) -> list[FrameScale]:
        """Frames that give an estimate, the most trusted kind there are at least ``MIN_LONE_FRAMES`` of:
        frames measured on lone discocytes, else on lone red cells, else every measured frame. A frame
        of nothing but touching red cells gives a biased estimate, and on PBC such frames (eosinophil
        granules, broken rims of pale cells, crowds of overlapping cells) were the outliers (per-image
        CV 8.2% with them, 6.7% without; 5.5% on discocyte frames alone). A film crowded everywhere
        still gets a scale from its chains."""
        measured = [f for f in self.frames if f.um_per_px is not None]
        for trusted in ([f for f in measured if f.discocytes], [f for f in measured if f.lone]):
            if len(trusted) >= MIN_LONE_FRAMES:
                return trusted
        return measured

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
    def robust_cv(self) -> float | None:
        """1.4826 x median absolute deviation / median: the spread of typical frames, which a few
        frames from a thick part of the film (small, round red cells) do not dominate."""
        usable = self.usable
        if len(usable) < 2:
            return None
        median = float(np.median(usable))
        return float(1.4826 * np.median(np.abs(np.asarray(usable) - median)) / median)

    @property
    def uncertainty(self) -> float | None:
        """Relative standard error of the scale itself (the median of the frames' estimates): 1.2533 x the
        spread between frames / sqrt(frames). More frames make the scale surer; the spread stays."""
        usable = self.usable
        if len(usable) < 2:
            return None
        return float(1.2533 * np.std(usable) / np.sqrt(len(usable)) / np.median(usable))

    @property
    def red_cells(self) -> int:
        """Red cells measured in every frame."""
        return sum(f.count for f in self.frames)

    @property
    def red_cells_used(self) -> int:
        """Red cells of the frames that set the scale (``kept``)."""
        return sum(f.count for f in self.kept)

    def to_dict(self, names: list[str] | None = None) -> dict:
        """The report ``edge calibrate --json`` prints: the scale, its spread, and every frame's estimate."""
        names = names or [f"frame {i + 1}" for i in range(len(self.frames))]
        kept = {id(f) for f in self.kept}
        return {"um_per_px": None if self.um_per_px is None else round(self.um_per_px, 5),
                "cv": None if self.cv is None else round(self.cv, 4),
                "robust_cv": None if self.robust_cv is None else round(self.robust_cv, 4),
                "uncertainty": None if self.uncertainty is None else round(self.uncertainty, 4),
                "red_cells": self.red_cells, "red_cells_used": self.red_cells_used, "frames": len(self.frames), "frames_measured": len(self.usable),
                "per_image": [{"name": name, "red_cells": f.count, "lone_red_cells": f.lone, "discocytes": f.discocytes, "used": id(f) in kept,
                               "um_per_px": None if f.um_per_px is None else round(f.um_per_px, 5)}
                              for name, f in zip(names, self.frames)]}


def calibrate(frames: Iterable[np.ndarray]) -> Calibration:
    """Measure every frame (a generator is measured one frame at a time); the estimate is the median of the
    per-frame scales."""
    return Calibration(tuple(measure_frame(f) for f in frames))


#: Images whose longer sides differ by more than this factor are not of one camera at one magnification.
MIXED_SIZE_FACTOR = 1.25


def mixed_sizes(sides: dict[int, str]) -> str | None:
    """``"a.png: 640 px, b.png: 8000 px"`` where images (longer side -> a name) are of more than one camera or
    magnification, else None: one scale cannot size them all (a training source's, a replayed folder's)."""
    if sides and max(sides) > MIXED_SIZE_FACTOR * min(sides):
        return f"{sides[min(sides)]}: {min(sides)} px, {sides[max(sides)]}: {max(sides)} px"
    return None


def check_scale(um_per_px: float, what: str) -> float:
    """A configured or declared scale must be plausible; one line naming ``what`` otherwise."""
    if not MIN_UM_PER_PX <= um_per_px <= MAX_UM_PER_PX:
        raise UserError(
            f"{what} = {um_per_px} µm per pixel is outside {MIN_UM_PER_PX}-{MAX_UM_PER_PX}; measure it with "
            "`edge calibrate` (red cells are ~7.5 µm) and set that value"
        )
    return um_per_px


def drift(measured: float, configured: float) -> float:
    """Relative difference of a measured scale from the configured one (0.12 = 12%)."""
    return abs(measured - configured) / configured


def read_scale_file(folder: Path) -> float | None:
    """The scale a folder of frames declares in its ``SCALE_FILE``, or None when it has none."""
    path = folder / SCALE_FILE
    if not path.is_file():
        return None
    try:
        value = float(json.loads(path.read_text())["um_per_px"])
    except (ValueError, KeyError, TypeError, OSError):
        raise DataError(f"{path}: expected {{\"um_per_px\": NUMBER}}; fix it, delete it, or rewrite it with "
                        "`edge calibrate --source FOLDER --write`") from None
    return check_scale(value, str(path))


def write_scale_file(folder: Path, calibration: Calibration) -> Path:
    """Write the measured scale beside the frames, with how it was measured, for replay and training."""
    if calibration.um_per_px is None:
        raise UserError(f"no scale to write for {folder}: too few red cells were measured")
    path = folder / SCALE_FILE
    path.write_text(json.dumps({"um_per_px": round(calibration.um_per_px, 5), "measured_by": "edge calibrate",
                                "red_cells": calibration.red_cells_used, "frames_measured": len(calibration.usable),
                                "cv": calibration.cv, "uncertainty": calibration.uncertainty}, indent=2) + "\n")
    return path


def frames_scale(source: Path, given: float | None, measure_frames: int = 40) -> float:
    """The scale of replayed frames: given (``--um-per-px``), else the folder's ``SCALE_FILE``, else measured
    on the red cells of up to ``measure_frames`` of the frames themselves (said on stderr); never a guess.
    A given or declared scale that the frames' own red cells contradict (``contradicts``) is used as told,
    with a warning on stderr: it sizes both the cells searched for and the model's crops."""
    import sys

    if not source.exists():
        raise UserError(f"{source} does not exist; pass a folder of frames or an image file")
    folder = source if source.is_dir() else source.parent
    stated, what = (check_scale(given, "--um-per-px"), "--um-per-px") if given is not None else \
        (read_scale_file(folder), str(folder / SCALE_FILE))
    calibration = _measured(source, measure_frames if stated is None else STATED_SCALE_CHECK_FRAMES)
    measured = calibration.um_per_px
    if stated is not None:
        if contradicts(calibration, stated):
            print(f"edge: warning: these frames' red cells measure {measured:.4f} µm per pixel, {drift(measured, stated):.0%} "
                  f"from {what} = {stated}, by which the cells are sized and cropped for the model; check it with "
                  f"`edge calibrate --source {source}`", file=sys.stderr)
        return stated
    if measured is None:
        raise UserError(f"the scale of the frames in {folder} is unknown and their red cells are too few to measure it: "
                        f"pass --um-per-px (C-NMC's crops, cells cut onto black: {CNMC_UM_PER_PX}), or write {SCALE_FILE} with "
                        "`edge calibrate --source FRAMES --write`")
    print(f"edge: scale {measured:.4f} µm per pixel, measured on the red cells of {len(calibration.frames)} frame(s) "
          f"(pass --um-per-px or write {SCALE_FILE} to fix it)", file=sys.stderr)
    return check_scale(round(measured, 5), f"scale measured on {folder}")


def contradicts(calibration: Calibration, stated: float) -> bool:
    """Whether the red cells measured contradict a stated scale: by ``STATED_SCALE_WARNING`` where frames of
    discocytes set the measure, by ``STATED_SCALE_FACTOR`` otherwise."""
    measured = calibration.um_per_px
    if measured is None:
        return False
    kept = calibration.kept
    if kept and all(f.discocytes for f in kept):
        return drift(measured, stated) > STATED_SCALE_WARNING
    return off_by_factor(measured, stated)


def off_by_factor(measured: float, stated: float) -> bool:
    """Whether a measured scale is ``STATED_SCALE_FACTOR`` or more from a stated one, either way: another
    objective or binning, beyond what any film's red cells read."""
    return not 1 / STATED_SCALE_FACTOR < measured / stated < STATED_SCALE_FACTOR


def _measured(source: Path, count: int) -> Calibration:
    """The red cells of up to ``count`` readable frames spread over ``source``, read and measured one at a time
    (a folder of 12 MP frames is not held in memory). An unreadable frame is reported by the replay itself."""
    from edge.preprocessing import read_rgb
    from edge.sources.folder import image_files

    def readable() -> Iterator[np.ndarray]:
        files = image_files(source)
        for path in files[::max(1, len(files) // count)][:count]:
            try:
                yield read_rgb(path)
            except DataError:
                continue

    return calibrate(readable())
