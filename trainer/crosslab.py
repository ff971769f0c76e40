"""Where the model holds: labs and conditions it never trained on.

* BCCD (healthy smears from a third lab, never trained on): every interior white cell the
  device's own segmentation finds, its quality gate passes and an annotator boxed is a normal cell, so the share called ALL
  is a false-blast rate on a microscope the model has never seen.
* Scale: the same validation cells resampled to 0.7x and 1.4x pixel scale, with the matching
  µm per pixel, must get the same decision (the µm contract at work).
* Stain: the same cells under stain and white-balance shifts (haematoxylin/eosin strength in
  optical-density space, lamp colour, brightness) must get the same decision.

Each check makes crops with the device's segmentation and crop code, from raw images.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import cv2
import numpy as np

from edge.calibration import calibrate
from trainer.dataset import Sample, load_arrays
from edge.errors import DataError
from edge.gate import judge
from edge.preprocessing import CropContract, crop_cell, read_rgb
from edge.segmentation import SegmentationSettings, find_cells

if TYPE_CHECKING:
    from trainer.compose import SmearComposer

log = logging.getLogger(__name__)

Scorer = Callable[[np.ndarray], np.ndarray]


#: BCCD's scale, measured by `edge calibrate` on its red cells (0.0816 on its frames of discocytes today): the
#: one value the tests and benchmarks show BCCD's frames at.
BCCD_UM_PER_PX = 0.083


def wbc_boxes(xml_path: Path) -> list[tuple[int, int, int, int]]:
    boxes = []
    for obj in ET.parse(xml_path).getroot().iter("object"):
        if obj.findtext("name") == "WBC":
            box = obj.find("bndbox")
            x0, y0, x1, y1 = (int(float(box.findtext(k))) for k in ("xmin", "ymin", "xmax", "ymax"))
            boxes.append((x0, y0, x1, y1))
    return boxes


def iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def bccd_crops(root: Path, contract: CropContract, um_per_px: float | None = None) -> tuple[np.ndarray, dict]:
    """Model inputs of BCCD's annotated white cells as the device finds them, and the scale used."""
    frames = sorted((root / "JPEGImages").glob("*.jpg"))
    if um_per_px is None:
        um_per_px = calibrate([read_rgb(p) for p in frames[::max(1, len(frames) // 40)]]).um_per_px
        if um_per_px is None:
            raise DataError(f"{root}: too few red cells to measure the frames' scale; check the folder")
    settings = SegmentationSettings(um_per_px=um_per_px)
    crops, annotated = [], 0
    for path in frames:
        xml_path = root / "Annotations" / f"{path.stem}.xml"
        if not xml_path.is_file():
            continue
        image = read_rgb(path)
        truth = wbc_boxes(xml_path)
        annotated += len(truth)
        for cell in find_cells(image, settings):
            x, y, w, h = cell.bbox
            if any(iou((x, y, x + w, y + h), box) > 0.3 for box in truth) and judge(image, cell, um_per_px, settings).classify:
                crops.append(crop_cell(image, cell.mask, cell.bbox, um_per_px, contract))
    size = contract.size
    return (np.stack(crops) if crops else np.zeros((0, size, size, 3), np.uint8)), \
        {"frames": len(frames), "annotated_white_cells": annotated, "um_per_px": round(float(um_per_px), 4)}


def bccd_false_blasts(score: Scorer, root: Path, contract: CropContract,
                      threshold: float) -> tuple[dict, np.ndarray, np.ndarray]:
    """(record, crops, scores) of BCCD's white cells: all normal, so every call of ALL is false."""
    crops, record = bccd_crops(root, contract)
    scores = score(crops) if len(crops) else np.zeros(0)
    called = int(np.sum(scores >= threshold))
    return {**record, "white_cells_found": int(len(crops)), "called_all": called,
            "false_blast_rate": round(called / len(crops), 4) if len(crops) else None}, crops, scores


def _rescale(factor: float) -> Callable[[np.ndarray, Sample], tuple[np.ndarray, float]]:
    def transform(image: np.ndarray, sample: Sample) -> tuple[np.ndarray, float]:
        interpolation = cv2.INTER_AREA if factor < 1 else cv2.INTER_CUBIC
        resized = cv2.resize(image, None, fx=factor, fy=factor, interpolation=interpolation)
        return resized, sample.um_per_px / factor
    return transform


def stain_shift(image: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """Another lab's stain and lamp: optical-density scaling per channel around haematoxylin/eosin
    strength, a white-balance cast and a brightness change. Black (C-NMC background) stays black."""
    od = -np.log((image.astype(np.float32) + 1.0) / 256.0)
    od *= rng.uniform(1 - 0.25 * strength, 1 + 0.25 * strength, size=3).astype(np.float32)
    shifted = 256.0 * np.exp(-od) - 1.0
    shifted *= rng.uniform(1 - 0.08 * strength, 1 + 0.08 * strength, size=3).astype(np.float32)
    shifted *= np.float32(rng.uniform(1 - 0.1 * strength, 1 + 0.1 * strength))
    out = np.clip(shifted, 0, 255).astype(np.uint8)
    out[image.max(axis=2) == 0] = 0
    return out


def invariance(score: Scorer, samples: Sequence[Sample], contract: CropContract, threshold: float,
               reference: np.ndarray, seed: int = 0) -> dict:
    """Share of cells whose decision is unchanged under scale and stain shifts."""
    base = np.asarray(reference) >= threshold
    index = {id(s): i for i, s in enumerate(samples)}
    rngs = {id(s): np.random.default_rng(seed + i) for i, s in enumerate(samples)}
    shifts = {"scale_0.7x": _rescale(0.7), "scale_1.4x": _rescale(1.4),
              "stain_shift": lambda image, s: (stain_shift(image, rngs[id(s)]), s.um_per_px)}
    result: dict = {"cells": len(samples)}
    for name, transform in shifts.items():
        images, kept = load_arrays(samples, contract, transform=transform, progress=False)
        same = (score(images) >= threshold) == base[[index[id(s)] for s in kept]]
        result[name] = round(float(np.mean(same)), 4)
    return result


def on_smear(score: Scorer, cnmc: Sequence[Sample], composer: "SmearComposer", contract: CropContract,
             threshold: float) -> dict:
    """C-NMC cells, every one put on one of training's smear backgrounds and cut by the device's smear
    path: how a blast on a real smear is scored, against the same cells cut on black."""
    from trainer import metrics as M
    from trainer.compose import SmearComposer

    every = SmearComposer(composer.backgrounds, composer.um_per_px, share=1.0)
    images, kept = load_arrays(cnmc, contract, transform=every, progress=False)
    scores = score(images)
    return M.compute([s.label for s in kept], scores, threshold)
