"""Touching white cells told apart by a small learned model, where the stained mask shows no neck.

Why: the classical split (``edge.segmentation._split_touching``) finds a cell where the distance
transform of the stained region has a peak parted from the others by a neck. Cells pressed together,
or overlapping by a fifth of their radii, often leave no neck: three blasts around a fourth become one
fat region. A person still sees where one cell ends (a rim of cytoplasm, a change of colour), and so
can a small fully convolutional model. It maps each pixel to its *inner distance*: how deep it lies
in its own cell's outline (the convex hull of what shows of it), relative to that cell's deepest point
(``CONTRACT``). Cells are then its cores (the inner half of each cell) grown back to the cell's edge,
each core keeping the pixels nearest to it.

The model runs only on stained regions large enough to hold two cells, at its own physical scale
(``UM_PER_PX``), so most lone cells cost nothing more. It ships in the model bundle
(``manifest["splitter"]``); a bundle without one keeps the classical split alone.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from edge.errors import BundleError
from edge.interpreter import as_input, open_interpreter

if TYPE_CHECKING:
    from edge.bundle import Bundle

#: What the model's output means; a bundle whose splitter declares a contract not in ``CONTRACTS`` is
#: refused. v2 (what ``trainer splitter`` teaches now) takes each cell's inner distance in its convex
#: hull, so a segmented nucleus (neutrophil, eosinophil) peaks once; v1 took it in the stained pixels
#: alone, which peaks once per lobe, so the device joins thin touching parts of a v1 map afterwards
#: (``LOBED_CONTRACTS``). Both decode the same way (``cells_from_distance``).
CONTRACT = "inner-distance-v2"
CONTRACTS = ("inner-distance-v1", CONTRACT)
#: Contracts whose maps cut a segmented nucleus at its filaments: their thin touching parts are joined.
LOBED_CONTRACTS = ("inner-distance-v1",)
#: The scale the model sees a frame at: a 15 µm cell is ~34 px across, enough for the rim between cells.
UM_PER_PX = 0.44
#: Inner distance of a cell's core: cores of touching cells are apart where their cells meet.
CORE_LEVEL = 0.5
#: Cores joined above this inner distance are one cell. Measured on PBC fields and PBC's own single-cell
#: images of the half the splitter never saw (528): at 0.5 (cores alone) 8 lone cells, mostly monocytes
#: with a folded nucleus, came out as two, at 0.45 4, at 0.4 2, at 0.35 none; clusters found 0.952, 0.950,
#: 0.935 and 0.900.
JOIN_LEVEL = 0.45
#: Inner distance above which a pixel belongs to some white cell.
FOREGROUND_LEVEL = 0.05
#: Smallest core and cell, as fractions of a disc of the typical cell diameter.
MIN_CORE_DISCS = 0.02
MIN_CELL_DISCS = 0.1
#: Input sides are padded to a multiple of this (the model halves the image twice).
SIDE_MULTIPLE = 4
#: The device pads further, to a multiple of this: regions of similar size then share one input shape,
#: and the interpreter is not re-planned for each (that cost ~0.6 ms a region, as much as the model).
SHAPE_STEP = 16


def cells_from_distance(distance: np.ndarray, diameter_px: float, join_level: float | None = None) -> list[np.ndarray]:
    """Each cell's mask (bool, the map's size) from an inner-distance map: a seed with the foreground
    pixels nearest to it that connect to it. A seed is a region above ``JOIN_LEVEL`` holding a core (a
    region above ``CORE_LEVEL``): where two cells meet the map falls to ~0, while a single cell with a
    folded or waisted nucleus (a monocyte) may show two cores joined above that level. ``diameter_px``:
    a typical cell's diameter at the map's scale, for the size limits."""
    join_level = JOIN_LEVEL if join_level is None else join_level
    disc = np.pi * (diameter_px / 2) ** 2
    foreground = (distance > FOREGROUND_LEVEL).astype(np.uint8)
    count, labels = cv2.connectedComponents((distance > join_level).astype(np.uint8), connectivity=8)
    core_area = np.bincount(labels[distance > CORE_LEVEL], minlength=count)
    seeds = [k for k in range(1, count) if core_area[k] >= MIN_CORE_DISCS * disc]
    if not seeds:
        return []
    # Every pixel's nearest seed: one distance transform, each seed a zero component of its input.
    not_seed = (~np.isin(labels, seeds)).astype(np.uint8)
    _, nearest = cv2.distanceTransformWithLabels(not_seed, cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_CCOMP)
    masks = []
    for k in seeds:
        ys, xs = np.nonzero(labels == k)
        territory = cv2.bitwise_and(foreground, (nearest == nearest[ys[0], xs[0]]).view(np.uint8))
        _, pieces = cv2.connectedComponents(territory, connectivity=8)
        mask = pieces == pieces[ys[0], xs[0]]  # stray pixels across a gap are not this cell's
        if np.count_nonzero(mask) >= MIN_CELL_DISCS * disc:
            masks.append(mask)
    return masks


class CellSplitter:
    """The bundle's splitter model on a LiteRT interpreter: inner-distance maps of frame regions."""

    def __init__(self, model_path: str | Path, *, um_per_px: float = UM_PER_PX, contract: str = CONTRACT,
                 num_threads: int = 2, runtime: str | None = None) -> None:
        self.model_path = Path(model_path)
        self.um_per_px = um_per_px  # the scale the model sees frames at (the bundle states it)
        #: Whether its maps cut segmented nuclei into lobes, which segmentation then joins.
        self.splits_lobes = contract in LOBED_CONTRACTS
        self.interpreter = open_interpreter(str(model_path), num_threads=num_threads, runtime=runtime)
        self._input = self.interpreter.get_input_details()[0]
        self._output = self.interpreter.get_output_details()[0]
        self._shape = tuple(int(n) for n in self._input["shape"])
        details = self.interpreter.get_input_details(), self.interpreter.get_output_details()
        out_shape = [int(n) for n in self._output["shape"]]
        if [len(d) for d in details] != [1, 1] or len(self._shape) != 4 or self._shape[-1] != 3 \
                or len(out_shape) != 4 or out_shape[-1] != 1:
            raise BundleError(f"{model_path} is not a cell splitter (it needs one RGB image in and one map out); "
                              "re-add it with `quantize splitter`")
        self._turn = threading.Lock()  # one invocation at a time: frames analysed at once take turns

    @classmethod
    def of(cls, bundle: "Bundle", *, num_threads: int = 2, runtime: str | None = None) -> "CellSplitter | None":
        """The bundle's splitter, or None when it has none."""
        located = bundle.splitter
        return cls(located[0], um_per_px=located[1], contract=located[2], num_threads=num_threads,
                   runtime=runtime) if located else None

    def distance(self, rgb: np.ndarray) -> np.ndarray:
        """The inner-distance map (float, 0..1) of an RGB image already at the model's scale."""
        height, width = rgb.shape[:2]
        padded = cv2.copyMakeBorder(rgb, 0, -height % SHAPE_STEP, 0, -width % SHAPE_STEP, cv2.BORDER_REFLECT)
        shape = (1,) + padded.shape
        with self._turn:
            if shape != self._shape:  # the model is fully convolutional: any size that is a multiple of 4
                self.interpreter.resize_tensor_input(self._input["index"], list(shape))
                self.interpreter.allocate_tensors()
                self._input = self.interpreter.get_input_details()[0]
                self._output = self.interpreter.get_output_details()[0]
                self._shape = shape
            self.interpreter.set_tensor(self._input["index"], as_input(padded[None], self._input))
            self.interpreter.invoke()
            raw = self.interpreter.get_tensor(self._output["index"])[0, :height, :width, 0].copy()
        scale, zero_point = self._output["quantization"]
        return raw.astype(np.float32) if scale == 0 else (raw.astype(np.float32) - zero_point) * scale

    def cells(self, region_rgb: np.ndarray, um_per_px: float, cell_diameter_um: float) -> list[np.ndarray]:
        """Masks (bool, the region's size) of the white cells in a frame region at ``um_per_px``."""
        height, width = region_rgb.shape[:2]
        factor = um_per_px / self.um_per_px
        small_size = (max(SIDE_MULTIPLE, round(width * factor)), max(SIDE_MULTIPLE, round(height * factor)))
        small = cv2.resize(np.ascontiguousarray(region_rgb), small_size, interpolation=cv2.INTER_AREA)
        masks = cells_from_distance(self.distance(small), cell_diameter_um / self.um_per_px)
        return [cv2.resize(mask.view(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST).view(bool)
                for mask in masks]
