"""C-NMC cells put back on a smear, so the way a cell was cut out cannot tell its source.

Why: on the device every cell, blast or not, is found on a smear by ``edge.segmentation``'s smear
path (nucleus, hull, stained pixels). C-NMC's cells arrive already cut out on black and take the
black-background path, while PBC's normal cells take the smear path. Trained that way, a model learns
"smear-path look = normal", and real blasts on a real smear are called normal (seen: composed sample
frames' blasts scored 0.05-0.3 against 0.5-0.9 for the same cells cut on black).

So half of the C-NMC cells (chosen by file name, both classes alike) are pasted, at their physical
size, onto real smear backgrounds: PBC images whose white cell was removed by inpainting (BCCD stays
out of training), and are then found and cut by the device's own smear path like every other cell.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import cv2
import numpy as np

from trainer.dataset import LABELS, Sample
from edge.preprocessing import read_rgb
from edge.segmentation import SegmentationSettings, find_cells


def smear_background(image: np.ndarray, um_per_px: float, margin_um: float = 1.5) -> np.ndarray | None:
    """The smear with its white cells painted out (red cells and background kept), each with a rim of
    ``margin_um`` around its mask (the default: the pale rim of cytoplasm)."""
    cells = find_cells(image, SegmentationSettings(um_per_px=um_per_px))
    if not cells:
        return None
    holes = np.zeros(image.shape[:2], np.uint8)
    for cell in cells:
        holes |= cell.full_mask(image.shape[:2]).astype(np.uint8)
    margin = max(3, int(margin_um / um_per_px)) | 1
    holes = cv2.dilate(holes, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (margin, margin)))
    return cv2.inpaint(image, holes, 5, cv2.INPAINT_TELEA)


def _pick(sample: Sample, modulo: int) -> int:
    return int(hashlib.sha256(sample.path.name.encode()).hexdigest()[:8], 16) % modulo


class SmearComposer:
    """``load_arrays`` transform: C-NMC cells picked by ``_pick`` go onto a smear background."""

    def __init__(self, backgrounds: Sequence[np.ndarray], um_per_px: float, share: float = 0.5) -> None:
        self.backgrounds = list(backgrounds)
        self.um_per_px = um_per_px
        self.share = share

    @classmethod
    def from_samples(cls, smear_samples: Sequence[Sample], count: int = 120, share: float = 0.5) -> "SmearComposer | None":
        """Backgrounds from up to ``count`` single-cell smear images of one source (e.g. PBC)."""
        if not smear_samples:
            return None
        step = max(1, len(smear_samples) // count)
        chosen = list(smear_samples)[::step][:count]
        backgrounds = [b for b in (smear_background(read_rgb(s.path), s.um_per_px) for s in chosen) if b is not None]
        return cls(backgrounds, chosen[0].um_per_px, share) if backgrounds else None

    def wants(self, sample: Sample) -> bool:
        return sample.cell_type in LABELS and _pick(sample, 1000) < 1000 * self.share

    def compose(self, image: np.ndarray, sample: Sample) -> np.ndarray:
        """The C-NMC cell at its physical size, edge softened, at the centre of a smear background."""
        mask = (image.max(axis=2) > 12).astype(np.uint8)
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((5, 5), np.uint8))
        ys, xs = np.nonzero(mask)
        if len(ys) == 0:
            return image
        image, mask = image[ys.min():ys.max() + 1, xs.min():xs.max() + 1], mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        factor = sample.um_per_px / self.um_per_px
        size = (max(1, round(image.shape[1] * factor)), max(1, round(image.shape[0] * factor)))
        cell = cv2.resize(image, size, interpolation=cv2.INTER_AREA).astype(np.float32)
        alpha = cv2.GaussianBlur(cv2.resize(mask.astype(np.float32), size, interpolation=cv2.INTER_AREA), (0, 0), 1.0)[..., None]
        canvas = self.backgrounds[_pick(sample, len(self.backgrounds))].copy()
        h, w = alpha.shape[:2]
        if h >= canvas.shape[0] or w >= canvas.shape[1]:  # larger than the field: pad the field
            canvas = cv2.copyMakeBorder(canvas, h, h, w, w, cv2.BORDER_REFLECT)
        y, x = (canvas.shape[0] - h) // 2, (canvas.shape[1] - w) // 2
        region = canvas[y:y + h, x:x + w].astype(np.float32)
        canvas[y:y + h, x:x + w] = (alpha * cell + (1 - alpha) * region).round().astype(np.uint8)
        return canvas

    def __call__(self, image: np.ndarray, sample: Sample) -> tuple[np.ndarray, float]:
        if self.wants(sample):
            return self.compose(image, sample), self.um_per_px
        return image, sample.um_per_px
