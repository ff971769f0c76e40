"""Find white cells in bright-field stained smear frames (and single cells on black, C-NMC style).

Why colour: in Wright/Giemsa-stained smears a white cell's nucleus is the only large blue-violet
object. Blue excess (B - R) separates it from pink red cells and the pale background across
stains better than hue alone; platelets are also violet but small, so size removes them. Lobed
nuclei (neutrophils) are merged by a closing sized to the cell; touching cells are split by a
distance-transform watershed. Detection runs on a reduced copy of the frame (OpenCV's basic steps
on a full 1080p frame already cost ~20 ms on a 2-core x86); masks are mapped back to full size. The
rules' levels are absolute, so that copy's light is made even first where a lamp lights the frame
unevenly, and its colour brought to the background the rules were set on.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import cv2
import numpy as np

from edge.errors import UserError
from edge.splitter import CellSplitter


@dataclass(frozen=True)
class SegmentationSettings:
    #: The frame's scale in micrometres per pixel (``edge calibrate`` measures it on red cells).
    #: Required for smear frames; cells already cut onto black (C-NMC style) need none to be found.
    um_per_px: float | None = None
    #: Typical white-cell diameter in micrometres: sizes the nucleus search (~180 px on BCCD frames).
    cell_diameter_um: float = 15.0
    #: Frames wider than this are searched at reduced scale.
    detect_width: int = 480
    #: Blue excess (B - R, 0..255) a nucleus pixel must exceed.
    blue_threshold: int = 35
    #: Or: darker than this in every channel and not red (heavily stained or stain-normalised nuclei).
    dark_level: int = 130
    #: Or (the nucleus, not the cytoplasm trim): darker than this in every channel and bluer than red
    #: by ``pale_nucleus_blue``: a violet nucleus that stains lighter (PBC's monocytes: blue excess ~25,
    #: brightest channel ~146 once the detection copy averages their chromatin). Red cells are never
    #: bluer than red, and blue cytoplasm is brighter. Without it, 2 of 25 PBC cells (monocytes) were
    #: missed outright at 0.083 µm/px.
    pale_nucleus_level: int = 150
    pale_nucleus_blue: int = 15
    #: Accepted nucleus areas relative to a disc of the typical cell diameter.
    min_area_fraction: float = 0.08
    max_area_fraction: float = 1.6
    min_solidity: float = 0.55
    #: Pixels darker than this in every channel count as C-NMC black background.
    black_level: int = 12
    border_margin_px: int = 2
    #: Show regions that may hold touching cells to the bundle's learned splitter, when it has one.
    learned_split: bool = True

    def diameter(self) -> float:
        """Typical white-cell diameter in frame pixels."""
        if not self.um_per_px:
            raise UserError("the frame scale is not set: measure it with `edge calibrate --source FRAMES` and set "
                            "segmentation.um_per_px (or pass --um-per-px)")
        return self.cell_diameter_um / self.um_per_px


@dataclass(frozen=True)
class Cell:
    bbox: tuple[int, int, int, int]  # x, y, width, height in frame pixels
    area: int  # cell mask area in frame pixels
    mask: np.ndarray  # bool, bbox-sized
    pre_cropped: bool = False
    #: The balance the cell was found with (``white_balance``, times ``illumination``'s gain at the cell where the
    #: frame was flattened): the gate reads its nucleus alike.
    balance: tuple[float, float, float] = (1.0, 1.0, 1.0)
    #: The sensor noise of the frame it was found in (``frame_noise``): the gate reads its focus net of it.
    noise: float = 0.0
    #: The part of the frame it was found in (x, y, width, height: the lit field inside a field stop,
    #: ``field_of_view``), or None for the whole frame: the gate takes its edge for the frame's.
    field: tuple[int, int, int, int] | None = None

    def full_mask(self, shape: tuple[int, int]) -> np.ndarray:
        full = np.zeros(shape, bool)
        x, y, w, h = self.bbox
        full[y:y + h, x:x + w] = self.mask
        return full


def _stained(rgb: np.ndarray, blue_threshold: float, dark_level: int) -> np.ndarray:
    """uint8 mask of stained pixels: blue well above red, or dark and not red."""
    return cv2.min(_stain_planes(rgb, blue_threshold, dark_level)[0], 1)


def _stain_planes(rgb: np.ndarray, blue_threshold: float,
                  dark_level: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(the stained mask as 0/255, brightest channel, blue minus red): ``_stained`` and ``nucleus_pixels``
    read the same planes, split from the image once."""
    # A cell's box is a view into the frame: OpenCV's split takes ~10x longer on it than on a copy.
    red, green, blue = cv2.split(np.ascontiguousarray(rgb))
    # OpenCV's compare and bitwise ops (0/255 masks) in place of NumPy's bool arrays: ~3x faster, same pixels.
    brightest, blue_minus_red = cv2.max(cv2.max(red, green), blue), cv2.subtract(blue, red)
    dark = cv2.bitwise_and(cv2.compare(brightest, float(dark_level), cv2.CMP_LT),
                           cv2.compare(cv2.add(blue, 10), red, cv2.CMP_GE))
    blue_excess = cv2.compare(blue_minus_red, float(blue_threshold), cv2.CMP_GT)
    return cv2.bitwise_or(blue_excess, dark), brightest, blue_minus_red


#: The background colours (bare glass: blue / red, green / red) the colour rules were set on, from
#: BCCD's grey (0.99, 1.01) to PBC's cream (0.79, 0.91). A frame whose background lies outside this band
#: (a camera's white balance, a lamp's colour) is scaled to the nearest colour inside it; one inside is
#: left as it is, so the frames the rules were measured on see the same pixels.
BACKGROUND_BLUE_PER_RED = (0.78, 0.99)
BACKGROUND_GREEN_PER_RED = (0.88, 1.03)
#: ... and its brightest channel at least this (BCCD's darkest frame: 193; PBC ~254): a darker exposure
#: is brightened to it, as the dark and pale-nucleus levels are absolute.
BACKGROUND_LEVEL = 190.0


#: Where the lamp's light across a frame falls below this share of its brightest, the detection copy is flattened
#: before cells are looked for. The dark and pale-nucleus levels are absolute, so in a dim part of the field (an
#: off-centre lamp, a misaligned condenser, vignetting) red cells read as nuclei: BCCD frames (every third) lit
#: off-centre, dimmest 75% / 60% of the brightest, kept 0.920 / 0.655 of their white cells with 12 / 60 cells
#: counted on no white cell (``bench_robustness.py``); flattened, 0.989 with none, as recorded. BCCD's own frames
#: read 0.80-0.85 at their dimmest (PBC's 0.89-0.98): 0.8 leaves most as they are, and flattening them measured
#: the same.
EVEN_LIGHT = 0.8
#: Blocks (pixels of the detection copy, read at every second pixel) whose brightest tenth is the background's light.
LIGHT_BLOCK = 24
#: A block whose brightest tenth falls this far below the fitted light is covered by cells, not dimly lit.
LIGHT_COVERED = 0.06


def illumination(rgb: np.ndarray) -> np.ndarray | None:
    """The gain (float32, per pixel of ``rgb``, >= 1) that makes the lamp's light even across the frame, or None where
    it is even already (``EVEN_LIGHT``). The light is a smooth surface (quadratic in x and y) fitted to the brightest
    tenth of each block of the brightest channel: bare glass where there is any, and red cells barely absorb red.
    Blocks covered by cells read darker than the surface and are left out of the fit."""
    height, width = rgb.shape[:2]
    top = brightest(decimate(rgb, 2))
    block = LIGHT_BLOCK // 2
    rows, columns = top.shape[0] // block, top.shape[1] // block
    if rows < 3 or columns < 3:
        return None
    blocks = top[:rows * block, :columns * block].reshape(rows, block, columns, block).swapaxes(1, 2).reshape(rows, columns, -1)
    tenth = int(0.9 * block * block)
    level = np.partition(blocks, tenth, axis=2)[..., tenth].astype(np.float64).ravel()
    y, x = (np.mgrid[0:rows, 0:columns] + 0.5) * block * 2
    y, x = y.ravel() / height - 0.5, x.ravel() / width - 0.5
    terms = np.stack([np.ones_like(x), x, y, x * x, y * y, x * y], axis=1)
    used = level > 40  # a black corner outside the lamp's circle is no light to flatten
    if used.sum() < 6:
        return None
    for _ in range(3):
        coefficients = np.linalg.lstsq(terms[used], level[used], rcond=None)[0]
        used &= level >= (1 - LIGHT_COVERED) * (terms @ coefficients)
        if used.sum() < 6:
            return None
    c = coefficients.astype(np.float32)

    def light(points_y: int, points_x: int) -> np.ndarray:
        gy = np.linspace(-0.5, 0.5, points_y, dtype=np.float32)[:, None]
        gx = np.linspace(-0.5, 0.5, points_x, dtype=np.float32)[None, :]
        return c[0] + c[1] * gx + c[2] * gy + c[3] * gx * gx + c[4] * gy * gy + c[5] * gx * gy

    coarse = light(17, 17)  # the surface's extremes over the frame, closely enough, for ~1/500 of the work
    if float(coarse.max()) <= 0 or float(coarse.min()) >= EVEN_LIGHT * float(coarse.max()):
        return None
    surface = light(height, width)
    # Beyond the blocks it was fitted on (the frame's corners) a quadratic can fall further than the light does:
    # never below the dimmest background actually seen.
    floor = max(0.25 * float(surface.max()), (1 - LIGHT_COVERED) * float(level[used].min()))
    return float(surface.max()) / np.maximum(surface, floor)


def flattened(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(``rgb`` with the lamp's light made even, the gain used), or (``rgb``, None) where it is even already."""
    gain = illumination(rgb)
    if gain is None:
        return rgb, None
    return cv2.multiply(np.ascontiguousarray(rgb), cv2.merge([gain, gain, gain]), dtype=cv2.CV_8U), gain


def white_balance(rgb: np.ndarray) -> tuple[float, float, float]:
    """Per-channel gains that bring the frame's background (its brightest tenth in green: bare glass,
    lit by the lamp) into ``BACKGROUND_*_PER_RED`` and up to ``BACKGROUND_LEVEL``. The colour rules
    (blue excess, violet, not red) read B - R: a 15% blue gain on BCCD's frames turned their red cells
    into ~700 "white cells" on 182 frames. No bright background (a dark frame, a film covered edge to
    edge): no gains."""
    height, width = rgb.shape[:2]
    if height * width > 40_000:  # every second pixel each way is plenty for the background's colour (~4x faster)
        rgb = cv2.resize(rgb, (width // 2, height // 2), interpolation=cv2.INTER_NEAREST)
    rgb = np.ascontiguousarray(rgb)
    green = cv2.extractChannel(rgb, 1)
    counts = np.cumsum(cv2.calcHist([green], [0], None, [256], [0, 256]).ravel())
    level = int(np.searchsorted(counts, 0.9 * counts[-1]))
    red, green_mean, blue = cv2.mean(rgb, mask=cv2.compare(green, level, cv2.CMP_GE))[:3]
    if min(red, green_mean, blue) < 40:
        return (1.0, 1.0, 1.0)
    gain_green, gain_blue = (_into(value / red, band) for value, band in
                             ((green_mean, BACKGROUND_GREEN_PER_RED), (blue, BACKGROUND_BLUE_PER_RED)))
    exposure = max(1.0, BACKGROUND_LEVEL / max(red, green_mean * gain_green, blue * gain_blue))
    return (exposure, exposure * gain_green, exposure * gain_blue)


def _into(ratio: float, band: tuple[float, float]) -> float:
    """The gain that brings ``ratio`` into ``band``: exactly 1.0 when it is inside."""
    return 1.0 if band[0] <= ratio <= band[1] else float(np.clip(ratio, *band)) / ratio


def balanced(rgb: np.ndarray, gains: tuple[float, float, float]) -> np.ndarray:
    """``rgb`` with each channel scaled by its gain (uint8, saturated); the same array when there are none."""
    if gains == (1.0, 1.0, 1.0):
        return rgb
    return cv2.transform(np.ascontiguousarray(rgb), np.diag(np.asarray(gains, np.float32)))


def nucleus_pixels(rgb: np.ndarray, settings: SegmentationSettings) -> np.ndarray:
    """uint8 (0/1) mask of nucleus stain: ``_stained`` at the settings' levels, or dim in every channel
    and violet (``pale_nucleus_level``/``_blue``). Detection and the quality gate read the same nucleus."""
    stained, brightest, blue_minus_red = _stain_planes(rgb, settings.blue_threshold, settings.dark_level)
    dim = cv2.compare(brightest, float(settings.pale_nucleus_level), cv2.CMP_LT)
    violet = cv2.compare(blue_minus_red, float(settings.pale_nucleus_blue), cv2.CMP_GT)
    return cv2.min(cv2.bitwise_or(stained, cv2.bitwise_and(dim, violet)), 1)


def components(mask: np.ndarray) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """``cv2.connectedComponentsWithStats(mask, connectivity=8)`` for the objects (labels >= 1): the
    same count, labels, stats and centroids, but row 0 (the background) is left zero. Why: OpenCV's
    statistics pass costs ~9x its labelling (1 ms on a 480x270 detection copy); the objects are a few
    per cent of the pixels, so they are summed here from the labelled pixels alone."""
    count, labels = cv2.connectedComponents(mask, connectivity=8, ltype=cv2.CV_32S)
    stats = np.zeros((count, 5), np.int32)
    centroids = np.zeros((count, 2), np.float64)
    if count > 1:
        points = cv2.findNonZero((labels > 0).view(np.uint8)).reshape(-1, 2)  # raster order; ~10x np.nonzero
        xs, ys = points[:, 0], points[:, 1]
        ids = labels[ys, xs]
        area = np.bincount(ids, minlength=count)
        by_label = np.argsort(ids, kind="stable")  # grouped by label, rows still ascending
        starts = np.concatenate(([0], np.cumsum(area[1:])[:-1]))
        columns, rows = xs[by_label], ys[by_label]
        left, right = np.minimum.reduceat(columns, starts), np.maximum.reduceat(columns, starts)
        top, bottom = rows[starts], rows[starts + area[1:] - 1]
        stats[1:] = np.stack([left, top, right - left + 1, bottom - top + 1, area[1:]], axis=1)
        # Integer sums (exact in float64) over the area, as OpenCV divides them.
        centroids[1:, 0] = np.bincount(ids, weights=xs, minlength=count)[1:] / area[1:]
        centroids[1:, 1] = np.bincount(ids, weights=ys, minlength=count)[1:] / area[1:]
    return count, labels, stats, centroids


def decimate(frame_rgb: np.ndarray, step: int) -> np.ndarray:
    """``frame_rgb[::step, ::step]``, contiguous. NumPy copies a pixel-strided view byte by byte (~3.5 ms
    for 1080p); OpenCV's nearest-neighbour resize of the row view picks exactly those columns when the
    width is a multiple of ``step``, ~4x faster. Other widths take NumPy's copy: the pixels are the same."""
    rows = frame_rgb[::step]
    if frame_rgb.shape[1] % step == 0 and rows.strides[1:] == (frame_rgb.shape[2], 1):
        return cv2.resize(rows, (frame_rgb.shape[1] // step, rows.shape[0]), interpolation=cv2.INTER_NEAREST)
    return np.ascontiguousarray(rows[:, ::step])


def detection_copy(frame_rgb: np.ndarray, detect_width: int) -> tuple[np.ndarray, float]:
    """(the reduced copy cells are looked for on, no wider than ``detect_width``; its scale to the frame)."""
    scale = min(1.0, detect_width / frame_rgb.shape[1])
    return _downscale(frame_rgb, scale), scale


def _downscale(frame_rgb: np.ndarray, scale: float) -> np.ndarray:
    """The detection copy. Area averaging over a 12 MP frame costs ~25 ms; for strong reductions,
    decimate by an integer step first (nuclei are blobs many pixels wide), then average the rest."""
    if scale >= 1:
        return frame_rgb
    height, width = frame_rgb.shape[:2]
    step = int(0.5 / scale)
    source = decimate(frame_rgb, step) if step >= 2 else frame_rgb
    return cv2.resize(source, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA)


def brightest(rgb: np.ndarray) -> np.ndarray:
    """The largest channel per pixel. ``rgb.max(axis=2)`` reduces over 3 bytes at a time (~5 ms on a
    12 MP frame's 1/8 copy); OpenCV's per-plane max gives the same bytes ~20x faster."""
    red, green, blue = cv2.split(np.ascontiguousarray(rgb))
    return cv2.max(cv2.max(red, green), blue)


#: A frame with black beyond this share of it may be a smear seen through a round field stop (``field_of_view``).
FIELD_STOP_BLACK = 0.03
#: ... when its lit part covers at least this share of it (a round field in a 16:9 frame: 0.44; a cell cut onto black,
#: C-NMC's layout, at most 0.24) and at least ``FIELD_STOP_GLASS`` of that is bare glass: within 20% of its brightest
#: and about neutral (channels within ``FIELD_STOP_GLASS_CHROMA`` of the brightest). BCCD and PBC frames seen through a
#: round stop: at least 0.73 and 0.51 of it; C-NMC's cells at most 0.09, stained cells being coloured.
FIELD_STOP_LIT = 0.35
FIELD_STOP_GLASS = 0.3
FIELD_STOP_GLASS_CHROMA = 0.25
#: The rectangle kept inside the field is this much smaller than the largest that fits: the field's edge is soft.
FIELD_STOP_MARGIN = 0.03


def field_of_view(frame_rgb: np.ndarray, black_level: int, inscribed: bool = True) -> tuple[int, int, int, int] | None:
    """(x, y, width, height) of the round field of view a black field stop leaves lit, as an eyepiece or phone camera
    sees a smear: the circle's box within the frame, or (``inscribed``) the largest upright rectangle inside the circle,
    a little smaller (``FIELD_STOP_MARGIN``), which holds no black at all. None for a frame lit edge to edge (a camera
    on the microscope's photo port) and for a cell already cut onto black. Why: a frame over 30% black was taken for a
    cell cut onto black, one huge object; BCCD frames seen through a round stop showed no cell at all, without a word,
    and no red cell was measured in them. The field is the circle through the lit region's edge where that edge is not
    the frame's own (a least-squares fit), so a field wider than the frame is measured too."""
    step = 8
    reduced = decimate(frame_rgb, step)
    small = brightest(reduced)
    lit = (small > black_level).astype(np.uint8)
    if cv2.countNonZero(lit) > (1 - FIELD_STOP_BLACK) * lit.size:
        return None
    count, labels, stats, _ = cv2.connectedComponentsWithStats(lit, connectivity=8)
    if count < 2:
        return None
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    if stats[largest, cv2.CC_STAT_AREA] < FIELD_STOP_LIT * lit.size:
        return None
    region = labels == largest
    values, pixels = small[region].astype(np.float32), reduced[region].astype(np.float32)
    neutral = pixels.max(axis=1) - pixels.min(axis=1) <= FIELD_STOP_GLASS_CHROMA * np.maximum(values, 1.0)
    if np.count_nonzero((values >= 0.8 * np.percentile(values, 99)) & neutral) < FIELD_STOP_GLASS * values.size:
        return None
    contours, _ = cv2.findContours(region.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    edge = max(contours, key=len).reshape(-1, 2).astype(np.float64)
    height, width = small.shape
    arc = edge[(edge[:, 0] > 0) & (edge[:, 1] > 0) & (edge[:, 0] < width - 1) & (edge[:, 1] < height - 1)]
    if len(arc) < 20:
        return None
    # The circle x^2 + y^2 + D x + E y + F = 0 through the arc, by least squares (Kasa's fit).
    (d, e, f), *_ = np.linalg.lstsq(np.column_stack([arc, np.ones(len(arc))]), -(arc ** 2).sum(axis=1), rcond=None)
    cx, cy = -d / 2, -e / 2
    radius = np.sqrt(max(cx * cx + cy * cy - f, 0.0))
    half_x = half_y = radius  # the circle's box
    if inscribed:  # the largest rectangle centred on the field's centre within both the circle and the frame
        radius *= 1 - FIELD_STOP_MARGIN
        room_x, room_y = max(min(cx, width - cx), 0.0), max(min(cy, height - cy), 0.0)
        half_x = half_y = radius / np.sqrt(2)
        if half_y > room_y:
            half_y, half_x = room_y, np.sqrt(max(radius * radius - room_y * room_y, 0.0))
        if half_x > room_x:
            half_x, half_y = room_x, min(room_y, np.sqrt(max(radius * radius - room_x * room_x, 0.0)))
    full_h, full_w = frame_rgb.shape[:2]
    x0, y0 = max(0, int(np.ceil((cx - half_x) * step))), max(0, int(np.ceil((cy - half_y) * step)))
    x1, y1 = min(full_w, int((cx + half_x) * step)), min(full_h, int((cy + half_y) * step))
    return (x0, y0, x1 - x0, y1 - y0) if x1 - x0 > 16 and y1 - y0 > 16 else None


def _is_black_background(frame: np.ndarray, level: int) -> bool:
    small = brightest(decimate(frame, 8))
    return cv2.countNonZero((small <= level).view(np.uint8)) > 0.3 * small.size


def _solidity(mask: np.ndarray) -> float:
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    hull_area = cv2.contourArea(cv2.convexHull(np.vstack(contours)))
    return float(np.count_nonzero(mask) / hull_area) if hull_area else 0.0


def _group_fragments(stats: np.ndarray, centroids: np.ndarray, keep: list[int], disc: float, diameter: float) -> list[list[int]]:
    """Lobes of one nucleus (eosinophils, neutrophils) often survive the closing as separate
    pieces: join pieces smaller than half a nucleus whose centres lie within 0.6 diameters."""
    parent = {i: i for i in keep}

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    fragments = [i for i in keep if stats[i, cv2.CC_STAT_AREA] < 0.45 * disc]
    # All pairwise distances at once (a 12 MP frame has ~100 fragments: 5,000 pairs), joined in the
    # same order as a pair-by-pair loop would.
    points = centroids[fragments]
    offsets = points[:, None, :] - points[None, :, :]
    near = np.sqrt((offsets * offsets).sum(axis=2)) < 0.6 * diameter
    for a, b in zip(*np.nonzero(np.triu(near, 1))):
        parent[root(fragments[a])] = root(fragments[b])
    groups: dict[int, list[int]] = {}
    for i in keep:
        groups.setdefault(root(i), []).append(i)
    return list(groups.values())


#: A nucleus is at least this many cell diameters across (~5 µm at the 15 µm default): distance
#: peaks shallower than half of it are lobes or necks, not the centres of separate cells.
MIN_NUCLEUS_DIAMETERS = 0.3
#: Two peaks are two cells when the distance dips between them below this fraction of the
#: shallower peak (a neck where the cells touch); a lobed or oblong nucleus has no such dip.
SADDLE_RATIO = 0.85
#: Stained regions larger than this many typical nuclei are tried for a split.
SPLIT_ABOVE_DISCS = 0.9
#: Or: two peaks further apart than this many times the sum of their inscribed radii are two cells
#: side by side (a broad contact leaves no neck; one round nucleus holds no two such circles).
SEPARATION = 0.75
#: Smaller regions (down to ``SMALL_PAIR_DISCS``) are split only into parts of at least ``SMALL_PART_DISCS``
#: each: two small cells (lymphocytes, small blasts) side by side, not the lobes of one nucleus.
SMALL_PAIR_DISCS = 0.5
SMALL_PART_DISCS = 0.35
#: Stained regions larger than this many typical nuclei are shown to the learned splitter (~1 ms each on
#: 2 cores). Measured: of the composed clusters it split, 99% had regions above 0.6 (the smallest 0.58);
#: of BCCD's lone white cells 38% do, against every one above 0.5: frames of lone cells pay a third as much.
LEARNED_SPLIT_ABOVE_DISCS = 0.6


def _separate(distance: np.ndarray, a: np.ndarray, b: np.ndarray, depth: float) -> bool:
    """Whether the straight path from peak ``a`` to peak ``b`` dips below ``SADDLE_RATIO * depth``."""
    steps = max(2, int(np.linalg.norm(b - a)))
    xs = np.linspace(a[0], b[0], steps).round().astype(int)
    ys = np.linspace(a[1], b[1], steps).round().astype(int)
    return float(distance[ys, xs].min()) < SADDLE_RATIO * depth


def _split_touching(component: np.ndarray, diameter: float) -> list[np.ndarray]:
    """Touching cells separated at the physical scale. Each cell is a peak of the distance transform
    deep enough to be a nucleus' centre (``MIN_NUCLEUS_DIAMETERS``) and parted from every deeper
    peak by a neck (``SADDLE_RATIO``, a saddle test); then each cell is given
    its pixels (nearest circle). A global threshold (half the deepest peak, tried before) missed smaller cells
    beside a large one and merged chains of cells that overlap."""
    distance = cv2.distanceTransform(component, cv2.DIST_L2, 5)
    local_max = (distance >= cv2.dilate(distance, np.ones((5, 5), np.uint8))) & (distance >= MIN_NUCLEUS_DIAMETERS * diameter / 2)
    count, markers, _, centres = cv2.connectedComponentsWithStats(local_max.astype(np.uint8), connectivity=8)
    if count <= 2:
        return [component]
    depth = [0.0] + [float(distance[int(round(centres[k][1])), int(round(centres[k][0]))]) for k in range(1, count)]
    kept: list[int] = []
    for k in sorted(range(1, count), key=lambda k: -depth[k])[:64]:
        if all(_separate(distance, centres[k], centres[j], depth[k])
               or np.linalg.norm(centres[k] - centres[j]) >= SEPARATION * (depth[k] + depth[j]) for j in kept):
            kept.append(k)
    if len(kept) <= 1:
        return [component]
    # Each pixel goes to the cell whose circle (centre, inscribed radius) it lies deepest in: the
    # boundary runs through the neck, and a larger cell keeps its larger share. (OpenCV's watershed
    # floods by the image's gradient, not its values, and cut distance maps into onion rings.)
    reach = np.empty((len(kept),) + component.shape, np.float32)
    for index, k in enumerate(kept):
        seed = np.ones(component.shape, np.uint8)
        seed[markers == k] = 0
        reach[index] = cv2.distanceTransform(seed, cv2.DIST_L2, 5) - depth[k]
    owner = np.argmin(reach, axis=0)
    return [((owner == index) & (component > 0)).astype(np.uint8) for index in range(len(kept))]


def find_cells(frame_rgb: np.ndarray, settings: SegmentationSettings = SegmentationSettings(),
               splitter: CellSplitter | None = None) -> list[Cell]:
    """White cells in an RGB frame, skipping those cut by the frame border. A stained region large enough
    to hold two cells is shown to ``splitter`` (the bundle's learned splitter) when there is one; where it
    sees two or more cells there, they are the cells, otherwise the classical split decides."""
    if frame_rgb is None or frame_rgb.size == 0 or frame_rgb.ndim != 3:
        raise UserError("empty frame: the camera or file delivered no pixels; check the source")
    # Seen through a round field stop: the circle's box, whose black corners (at most ~21%) the smear path reads as it
    # reads a field wider than the frame (the same cells as the frame seen plainly; tests/test_segmentation.py).
    field = field_of_view(frame_rgb, settings.black_level, inscribed=False)
    if field is not None:
        x, y, w, h = field
        return [replace(cell, bbox=(cell.bbox[0] + x, cell.bbox[1] + y, cell.bbox[2], cell.bbox[3]), field=field)
                for cell in _find_in_smear(frame_rgb[y:y + h, x:x + w], settings, splitter)]
    if _is_black_background(frame_rgb, settings.black_level):
        return _find_on_black(frame_rgb, settings)
    return _find_in_smear(frame_rgb, settings, splitter)


def _find_in_smear(frame_rgb: np.ndarray, settings: SegmentationSettings, splitter: CellSplitter | None) -> list[Cell]:
    """``find_cells`` on a smear frame (or the box of the round field a field stop leaves lit)."""
    height, width = frame_rgb.shape[:2]
    noise = frame_noise(frame_rgb)
    small, scale = detection_copy(frame_rgb, settings.detect_width)
    small, flat = flattened(small)
    gains = white_balance(small)
    small = _denoised(balanced(small, gains), noise * scale)  # averaged down with the frame (as white noise is)

    def gains_at(x: float, y: float) -> tuple[float, float, float]:
        """The balance a cell centred at (x, y) of the detection copy is read with: the frame's, times the
        flattening gain there (the light varies little across a cell)."""
        if flat is None:
            return gains
        local = float(flat[min(int(y), flat.shape[0] - 1), min(int(x), flat.shape[1] - 1)])
        return (gains[0] * local, gains[1] * local, gains[2] * local)

    diameter = settings.diameter() * scale
    nucleus = nucleus_pixels(small, settings)
    nucleus = cv2.morphologyEx(nucleus, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    close = max(3, int(diameter * 0.14) | 1)
    nucleus = cv2.morphologyEx(nucleus, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (close, close)))
    disc = np.pi * (diameter / 2) ** 2
    count, labels, stats, centroids = components(nucleus)
    keep = [i for i in range(1, count) if stats[i, cv2.CC_STAT_AREA] >= 0.04 * disc]  # platelets are smaller
    margin = settings.border_margin_px
    cells = []
    for group in _group_fragments(stats, centroids, keep, disc, diameter):
        x0 = min(stats[i, 0] for i in group)
        y0 = min(stats[i, 1] for i in group)
        x1 = max(stats[i, 0] + stats[i, 2] for i in group)
        y1 = max(stats[i, 1] + stats[i, 3] for i in group)
        cut = _at_edge((x0, y0, x1, y1), small.shape[:2], margin)
        box = labels[y0:y1, x0:x1]
        component = (box == group[0] if len(group) == 1 else np.isin(box, group)).astype(np.uint8)  # isin sorts: 10x slower
        stained = np.count_nonzero(component)
        if cut and stained <= SMALL_PAIR_DISCS * disc:
            continue  # cut by the frame border: half a cell is no evidence
        if splitter is not None and stained > LEARNED_SPLIT_ABOVE_DISCS * disc:
            learned = _split_learned(frame_rgb, splitter, component, (x0, y0), scale, settings,
                                     gains_at((x0 + x1) / 2, (y0 + y1) / 2), noise)
            if learned is not None:
                cells.extend(learned)
                continue
        parts = _nuclei(component, disc, diameter)
        neighbours: list[np.ndarray] = []
        if cut:
            # A whole cell touching one cut by the border (often merged with it by the closing): what
            # the split leaves off the edge is looked at again as a nucleus of its own, lobes together.
            inside = [part for part in parts if not _at_edge(_extent(part, (x0, y0)), small.shape[:2], margin)]
            if not inside:
                continue
            kept = np.bitwise_or.reduce(inside) if len(inside) > 1 else inside[0]
            neighbours = [component & (1 - kept)]  # the cut cell: the kept cell's rim must not reach into it
            parts = _nuclei(kept, disc, diameter)
        rim = 0.12 * diameter
        pad = int(np.ceil(rim)) + 2
        everything = parts + neighbours
        owner = _territories(everything, pad) if len(everything) > 1 else None
        for index, part in enumerate(parts):
            part_area = int(np.count_nonzero(part))
            if not settings.min_area_fraction * disc <= part_area <= settings.max_area_fraction * disc:
                continue
            if len(group) == 1 and _solidity(part) < settings.min_solidity:
                continue
            cell = _cell_from_nucleus(part, (x0, y0), scale, rim, (height, width))
            if owner is not None:  # a cell of a split cluster: its rim must not reach into its neighbours
                cell = _within(cell, owner == index, (x0 - pad, y0 - pad), scale)
            x, y, w, h = cell.bbox
            cell_gains = gains_at((x + w / 2) * scale, (y + h / 2) * scale)
            cell = _keep_stained(frame_rgb, cell, settings, cell_gains, noise)
            cell = _tight(cell) if owner is not None else cell
            cells.append(replace(cell, balance=cell_gains, noise=noise))
    return cells


def _split_learned(frame_rgb: np.ndarray, splitter: CellSplitter, component: np.ndarray, offset: tuple[int, int],
                   scale: float, settings: SegmentationSettings, gains: tuple[float, float, float],
                   noise: float = 0.0) -> list[Cell] | None:
    """The cells the splitter finds in a stained region (detection scale, top-left at ``offset``) and a
    margin around it, at full resolution; None when it finds fewer than two there. A cell counts only
    where it holds some of the region's stained pixels (a nucleus, not a neighbour's cytoplasm)."""
    height, width = frame_rgb.shape[:2]
    diameter = settings.diameter()
    pad = 0.3 * diameter
    x0, y0 = offset[0] / scale, offset[1] / scale
    left, top = max(0, int(x0 - pad)), max(0, int(y0 - pad))
    right = min(width, int(np.ceil((offset[0] + component.shape[1]) / scale + pad)))
    bottom = min(height, int(np.ceil((offset[1] + component.shape[0]) / scale + pad)))
    masks = splitter.cells(balanced(frame_rgb[top:bottom, left:right], gains), float(settings.um_per_px), settings.cell_diameter_um)
    if len(masks) < 2:
        return None
    evidence = np.zeros((bottom - top, right - left), np.uint8)
    up = cv2.resize(component, (max(1, round(component.shape[1] / scale)), max(1, round(component.shape[0] / scale))),
                    interpolation=cv2.INTER_NEAREST)
    ox, oy = round(x0) - left, round(y0) - top
    up = up[:evidence.shape[0] - oy, :evidence.shape[1] - ox]
    evidence[oy:oy + up.shape[0], ox:ox + up.shape[1]] = up
    least = 0.04 * np.pi * (diameter / 2) ** 2  # as for a region: smaller is a platelet's worth
    kept = [mask for mask in masks if np.count_nonzero(evidence[mask]) >= least]
    if splitter.splits_lobes:
        kept = _join_lobes(kept, evidence, MIN_NUCLEUS_DIAMETERS * diameter / 2)
    if len(kept) < 2:
        return None
    margin = settings.border_margin_px / scale
    cells = []
    for mask in kept:
        ys, xs = np.nonzero(mask)
        box = (left + int(xs.min()), top + int(ys.min()), left + int(xs.max()) + 1, top + int(ys.max()) + 1)
        if _at_edge(box, (height, width), int(margin)):
            continue  # cut by the frame border
        own = mask[box[1] - top:box[3] - top, box[0] - left:box[2] - left]
        cell = Cell(bbox=(box[0], box[1], box[2] - box[0], box[3] - box[1]), area=int(np.count_nonzero(own)), mask=own)
        cells.append(replace(_tight(_keep_stained(frame_rgb, cell, settings, gains, noise)), balance=gains, noise=noise))
    return cells


def _join_lobes(masks: list[np.ndarray], evidence: np.ndarray, min_radius: float) -> list[np.ndarray]:
    """Touching cells whose stain is all thinner than a nucleus (its widest inscribed circle under
    ``min_radius``, the classical split's ``MIN_NUCLEUS_DIAMETERS``) are the lobes of one segmented
    nucleus (neutrophils, eosinophils), joined into one cell. A v1 splitter (``LOBED_CONTRACTS``), whose
    target peaked once per lobe, cuts some at a thin filament; a v2 map keeps them one cell itself.
    Measured with v1 on 1,050 clustered cells: the parts of cells it cut in two had an inscribed radius
    of 0.8-2.0 µm (5th-95th percentile, median 1.5), whole cells' nuclei a median of 3.9 µm; joining
    parts under 2.25 µm (0.3 of 15 µm) found 6 more cells."""
    if len(masks) < 2:
        return masks
    stained = evidence.astype(bool)
    thin = [float(cv2.distanceTransform(np.pad((stained & mask).view(np.uint8), 1), cv2.DIST_L2, 5).max()) < min_radius
            for mask in masks]
    if sum(thin) < 2:
        return masks
    group = list(range(len(masks)))
    for a in range(len(masks)):
        if not thin[a]:
            continue
        grown = cv2.dilate(masks[a].view(np.uint8), np.ones((3, 3), np.uint8)).view(bool)
        for b in range(a + 1, len(masks)):
            if thin[b] and group[b] != group[a] and (grown & masks[b]).any():
                old, new = group[b], group[a]
                group = [new if g == old else g for g in group]
    joined: dict[int, np.ndarray] = {}
    for index, mask in enumerate(masks):
        joined[group[index]] = joined[group[index]] | mask if group[index] in joined else mask
    return list(joined.values())


def _nuclei(component: np.ndarray, disc: float, diameter: float) -> list[np.ndarray]:
    """A stained region as one or more nuclei: split where cells touch, but a small region is split
    only into parts that are each a cell's nucleus (two small cells, not the lobes of one)."""
    area = int(np.count_nonzero(component))
    parts = _split_touching(component, diameter) if area > SMALL_PAIR_DISCS * disc else [component]
    if area <= SPLIT_ABOVE_DISCS * disc and min(int(np.count_nonzero(p)) for p in parts) < SMALL_PART_DISCS * disc:
        return [component]  # a lobed nucleus, not two small cells
    return parts


def _at_edge(box: tuple[int, int, int, int], shape: tuple[int, int], margin: int) -> bool:
    """Whether ``box`` (x0, y0, x1, y1; x1 and y1 exclusive) reaches within ``margin`` of the edge of a
    frame of ``shape``: a nucleus there is cut by the border."""
    x0, y0, x1, y1 = box
    return x0 <= margin or y0 <= margin or x1 >= shape[1] - margin or y1 >= shape[0] - margin


def _extent(part: np.ndarray, offset: tuple[int, int]) -> tuple[int, int, int, int]:
    """The box (x0, y0, x1, y1) of a part's pixels, its top-left at ``offset``."""
    ys, xs = np.nonzero(part)
    return offset[0] + int(xs.min()), offset[1] + int(ys.min()), offset[0] + int(xs.max()) + 1, offset[1] + int(ys.max()) + 1


def _territories(parts: list[np.ndarray], pad: int) -> np.ndarray:
    """Which part each pixel of the parts' box (grown by ``pad``) is nearest to: the cells of a split
    cluster share out the cytoplasm rim around their nuclei instead of each taking a convex hull
    that covers its neighbours."""
    reach = np.empty((len(parts),) + tuple(n + 2 * pad for n in parts[0].shape), np.float32)
    for index, part in enumerate(parts):
        outside = cv2.copyMakeBorder((part == 0).astype(np.uint8), pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=1)
        reach[index] = cv2.distanceTransform(outside, cv2.DIST_L2, 5)
    return np.argmin(reach, axis=0)


def _within(cell: Cell, territory: np.ndarray, offset: tuple[int, int], scale: float) -> Cell:
    """``cell`` (full resolution) cut to ``territory`` (detection scale, its top-left at ``offset``)."""
    x, y, w, h = cell.bbox
    rows = (((np.arange(y, y + h) + 0.5) * scale).astype(int) - offset[1]).clip(0, territory.shape[0] - 1)
    cols = (((np.arange(x, x + w) + 0.5) * scale).astype(int) - offset[0]).clip(0, territory.shape[1] - 1)
    mask = cell.mask & territory[np.ix_(rows, cols)]
    return Cell(bbox=cell.bbox, area=int(np.count_nonzero(mask)), mask=mask)


def _tight(cell: Cell) -> Cell:
    """The cell's box shrunk to its mask."""
    ys, xs = np.nonzero(cell.mask)
    if ys.size == 0:
        return cell
    top, bottom, left, right = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    x, y = cell.bbox[:2]
    return Cell(bbox=(x + left, y + top, right - left, bottom - top), area=cell.area, mask=cell.mask[top:bottom, left:right])


def _cell_from_nucleus(component: np.ndarray, offset: tuple[int, int], scale: float, rim: float,
                       shape: tuple[int, int]) -> Cell:
    """The cell at full resolution: the nucleus' convex hull grown by a rim of cytoplasm."""
    contours, _ = cv2.findContours(component, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    outline = contours[0] if len(contours) == 1 else np.vstack(contours)
    hull = cv2.convexHull(outline).reshape(-1, 2).astype(np.float32) + np.float32(offset)
    centre = hull.mean(axis=0)
    spoke = hull - centre
    # np.linalg.norm's arithmetic without its dispatch (this runs per cell, under Python's lock).
    radius = np.maximum(np.sqrt(np.add.reduce(spoke * spoke, axis=1, keepdims=True)), 1.0)
    grown = (centre + spoke * (radius + rim) / radius) / scale
    np.clip(grown, 0, (shape[1] - 1, shape[0] - 1), out=grown)
    points = grown.round().astype(np.int32)
    x, y, w, h = cv2.boundingRect(points)
    mask = np.zeros((h, w), np.uint8)
    cv2.fillConvexPoly(mask, points - np.int32((x, y)), 1)
    return Cell(bbox=(x, y, w, h), area=cv2.countNonZero(mask), mask=mask.view(bool))


#: Sensor noise (``frame_noise``: the standard deviation of blue minus red, in levels) above which the detection copy
#: and each cell's box are smoothed before stain is read in them. Why: ``_keep_stained`` reads pale cytoplasm at a blue
#: excess of 14 (0.4 of ``blue_threshold``), and in a noisy frame the bare glass around a cell crosses that level pixel
#: by pixel; closed, those pixels join the cell's mask as a ring of background, whose colour then rules the crop's
#: colour normalisation and washes out the chromatin, and a nucleus near the levels breaks up. C-NMC blasts on BCCD
#: fields with camera noise of sigma 4 / 6 / 8 per channel were called ALL 0.803 / 0.495 / 0.394 (0.869 clean), and
#: 0.62 / 0.40 at sigma 6 / 8 blurred by 0.7 pixel, as demosaicing leaves it (``benchmarks/bench_blast_shifts.py``,
#: README "Camera noise"). Every BCCD and PBC frame reads below it (at most 1.3 and 1.8; the composed frames of the
#: tests and benchmarks 1.1), so clean frames are read exactly as before; white noise of sigma 2 per channel reads ~3.
NOISY_ABOVE = 2.0
#: ... smoothed by a Gaussian of this many pixels per level of noise: white noise is left at ~1 level, and noise that
#: demosaicing has blurred over a pixel at ~3. On the bundled frames with noise of sigma 4-12 per channel, white or
#: blurred over a pixel, every cell's outline stayed within 5% of its clean one; smoothed for white noise alone (0.14),
#: the blurred noise still grew them by 10-13%.
NOISE_BLUR_PX = 0.25
#: The noise is read in a grid of this many patches each way, each at most ``NOISE_PATCH`` pixels square.
NOISE_PATCHES = 4
NOISE_PATCH = 64
#: The scale (a Gaussian's sigma, pixels) below which ``frame_noise`` counts what it sees as noise.
NOISE_SCALE_PX = 2.0


def frame_noise(frame_rgb: np.ndarray) -> float:
    """The frame's sensor noise in blue minus red (levels; ~0 for a noiseless frame): the spread of what is left once
    detail coarser than ``NOISE_SCALE_PX`` is taken away, read in ``NOISE_PATCHES`` x ``NOISE_PATCHES`` patches spread
    over the frame at full resolution (~0.7 ms at 1080p), and taken from the quietest: a camera's noise is everywhere,
    while cell edges, chromatin and granules are left over too but only where there are cells. Within a patch, from the
    quietest quarter of its pixels (a normal's 25th percentile of |x| is 0.3186 of its spread). At that scale a camera's
    noise is read whole, although demosaicing and the camera's own processing blur it over a pixel or two."""
    height, width = frame_rgb.shape[:2]
    side = min(NOISE_PATCH, height // NOISE_PATCHES, width // NOISE_PATCHES)
    if side < 16:
        return 0.0
    left_over = []
    for row in range(NOISE_PATCHES):
        for column in range(NOISE_PATCHES):
            top = (2 * row + 1) * height // (2 * NOISE_PATCHES) - side // 2
            left = (2 * column + 1) * width // (2 * NOISE_PATCHES) - side // 2
            red, _, blue = cv2.split(np.ascontiguousarray(frame_rgb[top:top + side, left:left + side]))
            excess = cv2.subtract(blue, red, dtype=cv2.CV_32F)
            fine = excess - cv2.GaussianBlur(excess, (0, 0), NOISE_SCALE_PX)
            left_over.append(fine[4:-4:2, 4:-4:2].ravel())  # every second pixel each way: plenty
    patches = np.stack(left_over)
    deviation = np.abs(patches - np.median(patches, axis=1, keepdims=True))
    spreads = np.percentile(deviation, 25, axis=1) / 0.3186
    return float(np.percentile(spreads, 25))


def _denoised(rgb: np.ndarray, noise: float) -> np.ndarray:
    """``rgb`` smoothed by a Gaussian of ``NOISE_BLUR_PX`` per level of its ``noise`` (``frame_noise``), when that is
    above ``NOISY_ABOVE``; else the same array."""
    if noise <= NOISY_ABOVE:
        return rgb
    return cv2.GaussianBlur(rgb, (0, 0), NOISE_BLUR_PX * noise)


def _keep_stained(frame_rgb: np.ndarray, cell: Cell, settings: SegmentationSettings,
                  gains: tuple[float, float, float] = (1.0, 1.0, 1.0), noise: float = 0.0) -> Cell:
    """Trim the hull to the cell's stained pixels (nucleus and violet cytoplasm), so that pale
    background and red cells around it do not enter the model's crop, which in training showed
    a cell on black. ``noise``: the frame's (``frame_noise``); above ``NOISY_ABOVE`` the box is smoothed first."""
    x, y, w, h = cell.bbox
    stained = _stained(_denoised(balanced(frame_rgb[y:y + h, x:x + w], gains), noise), settings.blue_threshold * 0.4,
                       settings.dark_level)
    close = max(3, int(min(w, h) * 0.06) | 1)
    stained = cv2.morphologyEx(stained, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (close, close)))
    mask = cell.mask & stained.astype(bool)
    if np.count_nonzero(mask) < 0.3 * cell.area:  # pale cytoplasm and a faint stain: keep the hull
        return cell
    return Cell(bbox=cell.bbox, area=int(np.count_nonzero(mask)), mask=mask)


def _find_on_black(frame_rgb: np.ndarray, settings: SegmentationSettings) -> list[Cell]:
    """A cell already segmented onto black (C-NMC format): the largest foreground object."""
    foreground = (brightest(frame_rgb) > settings.black_level).astype(np.uint8)
    foreground = cv2.morphologyEx(foreground, cv2.MORPH_OPEN, np.ones((5, 5), np.uint8))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(foreground, connectivity=8)
    if count <= 1:
        return []
    index = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, w, h, area = (int(v) for v in stats[index])
    if area < 0.01 * frame_rgb.shape[0] * frame_rgb.shape[1]:
        return []
    mask = labels[y:y + h, x:x + w] == index
    mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, np.ones((5, 5), np.uint8)).astype(bool)
    return [Cell(bbox=(x, y, w, h), area=int(mask.sum()), mask=mask, pre_cropped=True)]
