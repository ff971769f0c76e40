"""The quality gate between segmentation and the classifier: which found objects are cells that
can be classified, and why the others are not.

Why: a count of blasts is only as good as what it counts. Leukaemic smears are full of smudge
(basket) cells and ragged broken cells, which the model calls blasts with high confidence; a cell
cut by the frame border, out of focus, or lying on red cells shows the model something it never
saw in training; stain debris and platelet clumps are not white cells at all. Each such object is
reported as "not classified" with its reason and is never counted.

Every measure is physical (µm, µm²) or taken at one fixed resampling (``FOCUS_UM_PER_PX``), so the
thresholds hold at any objective. The thresholds were set on clean single cells of three labs
(PBC, C-NMC, BCCD) so that at most ~1% of clean cells fall below each (``benchmarks/bench_gate.py``
measures the drop), and each rejects the defect it names on real cells made defective (tests).
"""

from __future__ import annotations

import functools
import statistics
from dataclasses import dataclass
from typing import NamedTuple

import cv2
import numpy as np

from edge.segmentation import NOISY_ABOVE, Cell, SegmentationSettings, balanced, decimate, nucleus_pixels

#: Focus is measured on the nucleus resampled to this scale, so that the number means the same at
#: every objective (the variance of the Laplacian grows as pixels get finer).
FOCUS_UM_PER_PX = 0.2
#: Variance of the Laplacian (green, 0.2 µm/px) below which a nucleus is out of focus. Clean cells
#: measure >= ~140 (BCCD p1; PBC and C-NMC higher); a 1 µm Gaussian blur brings all below 20.
MIN_FOCUS = 50.0
#: Smaller than this (µm², a disc of ~5 µm) is stain debris or a platelet, not a white cell
#: (the smallest clean white cells measure ~27 µm²).
MIN_AREA_UM2 = 20.0
#: Larger than this (µm², a disc of ~36 µm) is no white cell of a blood film (the largest, monocytes, reach
#: ~290 µm² on BCCD; a 450 px C-NMC crop is 625 µm² whole): a dim camera frame's lit centre taken for a cell
#: on black (the lamp nearly off: 1,010,705 px at 0.083 µm/px, classified "normal" before this rule), or a
#: frame replayed at a scale far too coarse.
MAX_CELL_UM2 = 1000.0
#: Lobed nuclei with trimmed cytoplasm go down to ~0.58 solidity; a torn, ragged cell lower.
MIN_SOLIDITY = 0.5
#: Larger than this with a washed-out, bare nucleus is a smudge (basket) cell: its chromatin has
#: spread into a pale smear with no cytoplasm. Most intact cells of a normal film stay under ~230 µm²
#: (large monocytes reach ~290 µm² on BCCD, and are told apart by their cytoplasm).
SMUDGE_AREA_UM2 = 250.0
#: A smudge's nucleus is pale: its mean green is this close (0..1) to the background's.
SMUDGE_PALENESS = 0.55
#: ... and bare: its stained chromatin fills at least this share of the object. Large intact cells with
#: pale nuclei (monocytes, reactive lymphocytes: BCCD measures 0.62-0.70) keep a rim of cytoplasm.
SMUDGE_NUCLEUS_SHARE = 0.8
#: A platelet clump: the stained object falls apart into this many pieces or more, each small.
#: (A white cell's nucleus always has one body of >= ~15 µm²; a clump is of 2-3 µm platelets.)
CLUMP_PIECES = 4
CLUMP_LARGEST_UM2 = 12.0
#: ... and small as a whole (pale monocyte nuclei also break into small stained pieces, but are larger).
CLUMP_MAX_UM2 = 80.0
#: Red-cell pixels are at most this much bluer (B - R) than the background; cytoplasm is bluer.
RED_CELL_BLUE_EXCESS = 10
#: A cell whose outline (convex hull) is more than this fraction red cell lies on red cells.
MAX_RED_OVERLAP = 0.3

#: A cell touching the frame's edge along more than this (µm) is cut: its crop would miss a part.
#: (Segmentation already skips nuclei cut by the edge; this catches cells whose cytoplasm is.)
MAX_BORDER_CONTACT_UM = 3.0

#: Every reason a cell is not classified; ``edge/schemas/frame-result.schema.json`` lists the same (tested).
REASONS = ("cut by border", "debris", "not a cell", "platelet clump", "broken", "smudge", "out of focus", "overlapping red cells")


@dataclass(frozen=True)
class Verdict:
    """Whether a cell goes to the classifier, why not, and its focus (reported either way)."""

    reason: str | None  # None: classify it
    focus: float

    @property
    def classify(self) -> bool:
        return self.reason is None


def nucleus_focus(crop_rgb: np.ndarray, nucleus: np.ndarray, um_per_px: float, noise_variance: float = 0.0) -> float:
    """Variance of the Laplacian of the green channel over the nucleus, at ``FOCUS_UM_PER_PX``, less ``noise_variance``
    (``noise_in_focus``: what the frame's sensor noise alone adds to it)."""
    factor = um_per_px / FOCUS_UM_PER_PX
    size = (max(1, round(crop_rgb.shape[1] * factor)), max(1, round(crop_rgb.shape[0] * factor)))
    if size == (crop_rgb.shape[1], crop_rgb.shape[0]):  # already at the focus scale (``judge`` resamples first)
        grey, inside = crop_rgb[..., 1], nucleus.astype(np.uint8)
    else:
        grey = cv2.resize(crop_rgb[..., 1], size, interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)
        inside = cv2.resize(nucleus.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
    inside = cv2.erode(inside, np.ones((3, 3), np.uint8))  # the nucleus' own edge is not texture
    if cv2.countNonZero(inside) < 20:
        return 0.0
    # The Laplacian of uint8 is whole numbers; OpenCV's masked spread (float64 sums) outside Python's lock.
    _, spread = cv2.meanStdDev(cv2.Laplacian(grey, cv2.CV_32F, ksize=3), mask=inside)
    return max(0.0, float(spread[0, 0]) ** 2 - noise_variance)  # noise is independent of the image: variances add


#: Immerkaer's kernel (1996): the difference of two Laplacians, blind to shading; white noise of sigma s comes out with a
#: spread of 6 s.
NOISE_KERNEL = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)


def noise_in_focus(crop_rgb: np.ndarray, mask: np.ndarray, factor: float, green_gain: float) -> float:
    """What the sensor noise alone adds to ``nucleus_focus`` for a cell whose crop (at the frame's resolution) is
    resampled by ``factor`` (at most 1) to the focus scale: the noise's spread in green where the cell is not (bare
    glass and red cells, with little detail of their own at full resolution), times ``green_gain`` (the balance the
    gate reads the cell at), squared, times ``_noise_gain(factor)``. Why: noise is all fine detail, so on BCCD frames
    with camera noise of sigma 4 per channel, cells blurred by 0.5 µm read as sharp, and the gate let 86 of 87
    through (5 without the noise). The kernel reads the finest detail, as white noise has it: noise that demosaicing
    or a camera's own processing has blurred over a pixel reads lower, and less is taken out than it adds (blurred
    cells then pass as they did before, and no sharp cell is set aside for it)."""
    response = np.abs(cv2.filter2D(crop_rgb[..., 1].astype(np.float32), -1, NOISE_KERNEL)[1:-1, 1:-1])
    outside = ~mask[1:-1, 1:-1]
    values = response[outside] if np.count_nonzero(outside) >= 100 else response.ravel()
    # The median: cell edges respond too, but on few pixels; a normal's median |x| is 0.6745 of its spread.
    sigma = float(np.median(values)) / (0.6745 * 6) * green_gain if values.size else 0.0
    return sigma * sigma * _noise_gain(round(factor, 3))


@functools.lru_cache(maxsize=16)
def _noise_gain(factor: float) -> float:
    """The variance of ``nucleus_focus``'s Laplacian on white noise of unit spread resampled by ``factor`` as ``judge``
    resamples a crop: the resampling averages neighbouring pixels, and the Laplacian weighs what is left. Both are
    linear, so the variance scales with the noise's; measured once per factor on a large noise image."""
    side = 1024
    noise = np.random.default_rng(0).normal(0.0, 1.0, (side, side)).astype(np.float32)
    if factor < 1:
        noise = cv2.resize(noise, (round(side * factor), round(side * factor)), interpolation=cv2.INTER_AREA)
    return float(cv2.Laplacian(noise, cv2.CV_32F, ksize=3)[2:-2, 2:-2].var())


def frame_focus(verdicts: list[Verdict]) -> float | None:
    """The frame's focus: the median of its cells' nucleus focus (None without cells). Measured on
    nuclei, not the whole field, so it reads on the same scale as ``MIN_FOCUS`` whatever else the
    frame holds, and costs nothing more."""
    return float(statistics.median(v.focus for v in verdicts)) if verdicts else None  # np.median's overhead on ~10 values


#: The brightest 1% of a bright-field frame is lit glass or a stained cell. Below this (0-255, brightest
#: channel) the lamp is off or nearly so, or the light path is shut: BCCD's smear frames read >= 199, cells
#: cut onto black (C-NMC's layout) >= 73.5, the lit centre of a frame with the lamp nearly off ~56.
DARK_FRAME_LEVEL = 64
#: The darkest 1% of a frame's brightest channel is its nuclei and red cells. From this up (0-255) they are
#: clipped in some channel and nuclei lose the colour they are found by: BCCD's frames read 158-181 as recorded,
#: PBC's 113-166. BCCD frames brightened as a lamp turned up under a fixed exposure would (x1.3-1.7, every third
#: frame) kept 0.97-0.98 of their white cells where they read below 240, 0.92 at 240-245, 0.80 at 245-250 and
#: 0.49 at 254-255.
OVEREXPOSED_LEVEL = 245
#: The most colourful 1% of a stained film (its brightest minus its dimmest channel, 0-255) is a violet nucleus
#: or a red cell: BCCD's smear frames read >= 76, PBC's >= 74, C-NMC's cells on black >= 48. A monochrome
#: camera, or a colour one delivering greyscale, reads 0. Their background alone (blank glass) reads 13-30 on
#: BCCD's camera and 17-64 on PBC's: the warning is for a camera without colour, not for an empty field.
NO_COLOUR_LEVEL = 16


class FrameProblem(NamedTuple):
    """Why a frame can show no cells, in words: what frames with it do ("are dark"), what to check, and what the
    agent logs when it ends."""

    doing: str
    hint: str
    ended: str


#: Frame problems, in the order judged (the agent's log and status, the page, `edge replay`, `edge check`,
#: `edge calibrate`, the results' ``light.problem``).
FRAME_PROBLEMS = {
    "dark": FrameProblem("are dark", "is the lamp on and the light path to the camera open?", "light is back"),
    "overexposed": FrameProblem("are overexposed", "turn the lamp down, or shorten source.exposure_us", "exposure is back in range"),
    "no_colour": FrameProblem("show no colour", "is it a colour camera, delivering colour frames (not greyscale)?", "colour is back"),
}


@dataclass(frozen=True)
class FrameLight:
    """Whether a frame can show cells at all: lit (``brightest``: its brightest 1%), not washed out (``darkest``: its
    darkest 1%, both of its brightest channel), in colour (``colourful``: its most colourful 1%, brightest minus dimmest
    channel). Every frame result carries it (``light``), so a sample's record says which frames could show no cells."""

    brightest: float
    darkest: float
    colourful: float

    @property
    def problem(self) -> str | None:
        """The first of ``FRAME_PROBLEMS`` the frame has (a dark frame's colour is its sensor noise), or None."""
        if self.brightest < DARK_FRAME_LEVEL:
            return "dark"
        if self.darkest >= OVEREXPOSED_LEVEL:
            return "overexposed"
        return "no_colour" if self.colourful < NO_COLOUR_LEVEL else None

    def warning(self, frame_name: str) -> str:
        """The one-line warning of the frame's problem: what, where, measured how, what to check."""
        problem = FRAME_PROBLEMS[self.problem]  # type: ignore[index]  # only asked of a frame with a problem
        return f"frames {problem.doing}: {frame_name} {self.measured()}; {problem.hint}"

    def measured(self) -> str:
        """What found the frame's problem, in words: "brightest 1% at 5 of 255 (below 64)"."""
        return {"dark": f"brightest 1% at {self.brightest:.0f} of 255 (below {DARK_FRAME_LEVEL})",
                "overexposed": f"darkest 1% at {self.darkest:.0f} of 255 ({OVEREXPOSED_LEVEL} or more)",
                "no_colour": f"most colourful 1% at {self.colourful:.0f} of 255 (below {NO_COLOUR_LEVEL})",
                None: f"brightest 1% at {self.brightest:.0f}, darkest at {self.darkest:.0f}, most colourful at {self.colourful:.0f} of 255"
                }[self.problem]

    def to_dict(self) -> dict:
        """The frame result's ``light`` (edge/schemas/frame-result.schema.json)."""
        return {"brightest": int(self.brightest), "darkest": int(self.darkest), "colourful": int(self.colourful),
                "problem": self.problem}

    @classmethod
    def from_dict(cls, light: dict) -> "FrameLight":
        return cls(light["brightest"], light["darkest"], light["colourful"])


def look_at(frame_rgb: np.ndarray) -> FrameLight:
    """A frame's light and colour (whole levels of 0-255), on every 16th pixel each way (~0.1 ms at 1080p)."""
    red, green, blue = cv2.split(decimate(frame_rgb, 16))
    top = cv2.max(cv2.max(red, green), blue)
    colourful = percentile_u8(cv2.subtract(top, cv2.min(cv2.min(red, green), blue)), 99)
    return FrameLight(*(float(round(level)) for level in (percentile_u8(top, 99), percentile_u8(top, 1), colourful)))


def percentile_u8(values: np.ndarray, q: float) -> float:
    """``np.percentile(values, q)`` (linear) of uint8 values, from a 256-bin histogram: the same number
    without sorting (a partial sort of every cell's pixels was ~0.1 ms a cell, 6 ms on a 12 MP frame)."""
    n = values.size
    counts = cv2.calcHist([np.ascontiguousarray(values).reshape(-1, 1)], [0], None, [256], [0, 256]).ravel()
    index = (n - 1) * (q / 100)
    below = int(np.floor(index))
    gamma = index - below
    cumulative = np.cumsum(counts)
    a = float(np.searchsorted(cumulative, below, side="right"))
    b = float(np.searchsorted(cumulative, min(below + 1, n - 1), side="right"))
    return b - (b - a) * (1 - gamma) if gamma >= 0.5 else a + (b - a) * gamma


def median_int(values: np.ndarray, low: int, high: int) -> float:
    """``np.median`` of integers in ``low..high``, from a histogram (no sort)."""
    n = values.size
    cumulative = np.cumsum(np.bincount((values.ravel().astype(np.int32) - low), minlength=high - low + 1))
    upper = float(np.searchsorted(cumulative, n // 2, side="right") + low)
    if n % 2:
        return upper
    lower = float(np.searchsorted(cumulative, n // 2 - 1, side="right") + low)
    return (lower + upper) / 2


def _red_cell_pixels(crop_rgb: np.ndarray, stained: np.ndarray) -> np.ndarray:
    """Red-cell pixels: darker than the background in green (haemoglobin) and no bluer than the
    background (a white cell's pale cytoplasm is darker too, but bluer), not stained violet.
    (Integer pixels against fractional levels: ``v >= t`` is ``v >= ceil(t)`` and ``v < t`` is
    ``v < ceil(t)``, so OpenCV's integer compares give NumPy's float ones.)"""
    red, green, blue = cv2.split(np.ascontiguousarray(crop_rgb))
    excess = cv2.subtract(blue, red, dtype=cv2.CV_16S)
    bright = cv2.compare(green, int(np.ceil(percentile_u8(green, 95))), cv2.CMP_GE)
    background = cv2.mean(green, mask=bright)[0]
    field_excess = median_int(excess[bright.view(bool)], -255, 255)
    darker = cv2.compare(green, int(np.ceil(0.85 * background)), cv2.CMP_LT)
    not_bluer = cv2.compare(excess, int(np.ceil(field_excess + RED_CELL_BLUE_EXCESS)), cv2.CMP_LT)
    return cv2.bitwise_and(darker, not_bluer).view(bool) & ~stained


def _border_contact(cell: Cell, shape: tuple[int, int]) -> int:
    """Pixels of the cell's outline that lie on the edge of the part of the frame it was found in (the frame, or the
    lit field inside a field stop: ``Cell.field``; a straight cut shows as a long run)."""
    left, top, width, height = cell.field or (0, 0, shape[1], shape[0])
    x, y, w, h = cell.bbox
    mask = cell.mask
    return int((mask[:, 0].sum() if x <= left else 0) + (mask[0].sum() if y <= top else 0)
               + (mask[:, -1].sum() if x + w >= left + width else 0) + (mask[-1].sum() if y + h >= top + height else 0))


def judge(frame_rgb: np.ndarray, cell: Cell, um_per_px: float,
          settings: SegmentationSettings = SegmentationSettings()) -> Verdict:
    """The gate's verdict on one found cell (``um_per_px``: the frame's scale).

    Every rule is in micrometres, so the cell is judged at ``FOCUS_UM_PER_PX`` (or its own scale if
    coarser): a 12 MP frame's cells then cost what a VGA frame's do."""
    x, y, w, h = cell.bbox
    crop = frame_rgb[y:y + h, x:x + w]
    mask = cell.mask
    height, width = frame_rgb.shape[:2]
    border_um = _border_contact(cell, (height, width)) * um_per_px
    factor = um_per_px / FOCUS_UM_PER_PX
    noise_variance = noise_in_focus(crop, mask, min(factor, 1.0), cell.balance[1]) if cell.noise > NOISY_ABOVE else 0.0
    if factor < 1:
        size = (max(1, round(w * factor)), max(1, round(h * factor)))
        crop = cv2.resize(crop, size, interpolation=cv2.INTER_AREA)
        mask = cv2.resize(mask.view(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool)
        um_per_px = FOCUS_UM_PER_PX
    # The colour rules, the focus and the red cells around are read at the balance and exposure the cell was found
    # at: the Laplacian's variance scales with the square of the light, and blue-minus-red differences with the
    # light, so a dim lamp or the dim side of a frame passed for blur and for cytoplasm on red cells. BCCD frames at
    # 45% / 35% of their light kept 0.805 / 0.391 of their white cells read on the raw pixels, 0.989 / 0.989 now.
    seen = balanced(crop, cell.balance)
    stained = nucleus_pixels(seen, settings).astype(bool)
    nucleus = stained & mask if not cell.pre_cropped else mask
    focus = nucleus_focus(seen, nucleus, um_per_px, noise_variance)
    if not cell.pre_cropped and border_um > MAX_BORDER_CONTACT_UM:
        return Verdict("cut by border", focus)
    pixel_um2 = um_per_px * um_per_px
    mask_pixels = np.count_nonzero(mask)
    area_um2 = mask_pixels * pixel_um2
    if area_um2 < MIN_AREA_UM2:
        return Verdict("debris", focus)
    if area_um2 > MAX_CELL_UM2:
        return Verdict("not a cell", focus)
    pieces, labels = cv2.connectedComponents(nucleus.view(np.uint8), connectivity=8)  # areas only: no stats pass
    areas = np.bincount(labels.ravel(), minlength=pieces)[1:] * pixel_um2
    areas = areas[areas >= 1.0]  # specks of chromatin texture are not pieces
    if len(areas) >= CLUMP_PIECES and float(areas.max()) < CLUMP_LARGEST_UM2 and area_um2 < CLUMP_MAX_UM2:
        return Verdict("platelet clump", focus)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    hull = cv2.convexHull(np.vstack(contours))
    hull_area = max(float(cv2.contourArea(hull)), 1.0)
    if mask_pixels / hull_area < MIN_SOLIDITY:
        return Verdict("broken", focus)
    if area_um2 > SMUDGE_AREA_UM2 and not cell.pre_cropped:
        background = percentile_u8(crop[..., 1], 95)
        inked = float(crop[..., 1][nucleus].mean()) if nucleus.any() else background
        if inked > SMUDGE_PALENESS * background and np.count_nonzero(nucleus) >= SMUDGE_NUCLEUS_SHARE * mask_pixels:
            return Verdict("smudge", focus)
    if focus < MIN_FOCUS:
        return Verdict("out of focus", focus)
    if not cell.pre_cropped:
        outline = np.zeros(mask.shape, np.uint8)
        cv2.fillConvexPoly(outline, hull, 1)
        outline = outline.astype(bool)
        if float(_red_cell_pixels(seen, stained)[outline].mean()) > MAX_RED_OVERLAP:
            return Verdict("overlapping red cells", focus)
    return Verdict(None, focus)
