"""Segmentation and the quality gate on another lab's colours, scale and camera: BCCD frames perturbed.

    python benchmarks/bench_robustness.py [--data ../shared/data] [--step 3] [--blue-threshold 35] [--noise-sweep]

Every ``step``-th BCCD frame, changed as another microscope would show it (a camera's white balance, a
lamp, exposure, stain strength and hue, magnification with the matching scale, sensor noise, JPEG, focus), goes
through ``find_cells`` and the gate at its scale. Recall: interior annotated white cells matched one to
one (IoU > 0.5) by a cell the gate lets through. Precision: found cells that lie on an annotated white
cell (IoU > 0.3). The classifier is not run here (``bench_crosslab.py --shifts`` runs the whole pipeline
under the colour shifts). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge.gate import judge  # noqa: E402
from edge.preprocessing import read_rgb  # noqa: E402
from edge.segmentation import SegmentationSettings, find_cells  # noqa: E402
from edge.splitter import CellSplitter  # noqa: E402
from trainer.crosslab import BCCD_UM_PER_PX, iou, wbc_boxes  # noqa: E402

BORDER = 5  # an annotated box this close to the edge is a cell cut by the border, skipped by design


#: Per-channel gains (R, G, B): another camera's white balance, another lamp, a darker exposure. Also
#: ``bench_crosslab.py --shifts`` (the whole pipeline) and ``tests/test_segmentation.py``.
COLOUR_SHIFTS: dict[str, tuple[float, float, float]] = {
    "blue white balance (x0.9, 1, 1.15)": (0.9, 1.0, 1.15),
    "magenta cast (x1, 0.9, 1.1)": (1.0, 0.9, 1.1),
    "yellow lamp (x0.85, 0.85, 1)": (0.85, 0.85, 1.0),
    "underexposed (x0.8)": (0.8, 0.8, 0.8),
}


def cast(gains: tuple[float, float, float]) -> Callable[[np.ndarray], np.ndarray]:
    """Each channel scaled by its gain (saturated, truncated to uint8)."""
    return lambda image: np.clip(image * np.float32(gains), 0, 255).astype(np.uint8)


def _stain(strength: float) -> Callable[[np.ndarray], np.ndarray]:
    """Every pixel pulled towards (< 1) or pushed away from (> 1) the background: a lighter or darker stain."""
    def apply(image: np.ndarray) -> np.ndarray:
        background = np.percentile(image.reshape(-1, 3), 90, axis=0).astype(np.float32)
        return np.clip(background - strength * (background - image), 0, 255).astype(np.uint8)
    return apply


def hue(degrees: int) -> Callable[[np.ndarray], np.ndarray]:
    """Every colour turned on the hue circle (OpenCV's hue is in steps of 2 degrees)."""
    def apply(image: np.ndarray) -> np.ndarray:
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + degrees // 2) % 180).astype(np.uint8)
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    return apply


def defocus(sigma_um: float, um_per_px: float = BCCD_UM_PER_PX) -> Callable[[np.ndarray], np.ndarray]:
    """The frame blurred as a focus a little off would show it: a Gaussian of ``sigma_um`` micrometres (0: as it is)."""
    if sigma_um <= 0:
        return lambda image: image
    return lambda image: cv2.GaussianBlur(image, (0, 0), sigma_um / um_per_px)


def noise(sigma: float, grain_px: float = 0.0) -> Callable[[np.ndarray], np.ndarray]:
    """A camera's noise: Gaussian, ``sigma`` levels per channel, white or blurred over ``grain_px`` pixels (a Gaussian's
    sigma) as demosaicing and a camera's own processing leave it; drawn afresh for each frame, from a fixed seed."""
    rng = np.random.default_rng(0)

    def apply(image: np.ndarray) -> np.ndarray:
        grain = rng.normal(0, 1, image.shape).astype(np.float32)
        if grain_px:
            grain = cv2.GaussianBlur(grain, (0, 0), grain_px)
            grain /= grain.std()
        return np.clip(image + sigma * grain, 0, 255).astype(np.uint8)
    return apply


#: ``--noise-sweep``: camera noise (sigma per channel) white and blurred over 0.7 / 1 pixel, on sharp frames and on frames
#: blurred by 0.5 µm (the focus gate's side).
NOISE_SWEEP: dict[str, tuple[Callable[[np.ndarray], np.ndarray], float]] = {
    **{f"noise sigma {sigma}{f' grain {grain} px' if grain else ''}{', defocus 0.5 µm' if blur else ''}":
       ((lambda n, b: lambda image: n(b(image)))(noise(sigma, grain), defocus(blur)), 1.0)
       for blur in (0.0, 0.5) for grain in (0.0, 0.7, 1.0) for sigma in (2, 4, 6, 8, 12)},
}


def _jpeg(quality: int) -> Callable[[np.ndarray], np.ndarray]:
    return lambda image: cv2.imdecode(cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])[1], cv2.IMREAD_UNCHANGED)


def camera_tone(saturation: float = 1.0, contrast: float = 1.0, gamma: float = 1.0) -> Callable[[np.ndarray], np.ndarray]:
    """A camera's own picture settings (picamera2's Saturation and Contrast controls, a tone curve): colour
    saturation scaled in HSV, contrast stretched about mid-grey, then a gamma curve."""
    curve = np.clip(255 * (np.arange(256) / 255) ** gamma, 0, 255).astype(np.uint8)

    def apply(image: np.ndarray) -> np.ndarray:
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV).astype(np.float32)
        hsv[..., 1] = np.clip(hsv[..., 1] * saturation, 0, 255)
        rgb = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)
        return cv2.LUT(np.clip((rgb - 128) * contrast + 128, 0, 255).astype(np.uint8), curve)
    return apply


def uneven(dimmest: float, centre: tuple[float, float] = (0.0, 0.0)) -> Callable[[np.ndarray], np.ndarray]:
    """The lamp's light falling off from ``centre`` (a share of the frame from its middle: an off-centre lamp or
    condenser) to ``dimmest`` of it at the far corner (vignetting when centred), quadratically."""
    def apply(image: np.ndarray) -> np.ndarray:
        height, width = image.shape[:2]
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        reach = np.hypot((x - width * (0.5 + centre[0])) / (width / 2), (y - height * (0.5 + centre[1])) / (height / 2)) / np.sqrt(2)
        light = 1 - (1 - dimmest) * np.clip(reach, 0, 1) ** 2
        return np.clip(image * light[..., None], 0, 255).astype(np.uint8)
    return apply


#: name -> (how the frame changes, how much larger it is shown: the scale is divided by this)
PERTURBATIONS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], float]] = {
    "as recorded": (lambda image: image, 1.0),
    **{name: (cast(gains), 1.0) for name, gains in COLOUR_SHIFTS.items()},
    "stain 0.7x": (_stain(0.7), 1.0),
    "stain 1.2x": (_stain(1.2), 1.0),
    "hue -20 degrees": (hue(-20), 1.0),
    "hue -10 degrees": (hue(-10), 1.0),
    "hue +10 degrees": (hue(10), 1.0),
    "hue +20 degrees": (hue(20), 1.0),
    "shown 0.5x": (lambda image: cv2.resize(image, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA), 0.5),
    "shown 2x": (lambda image: cv2.resize(image, None, fx=2.0, fy=2.0, interpolation=cv2.INTER_LINEAR), 2.0),
    "shown 0.25x (coarser than the model)": (lambda image: cv2.resize(image, None, fx=0.25, fy=0.25, interpolation=cv2.INTER_AREA), 0.25),
    "sensor noise sigma 6": (noise(6), 1.0),
    "sensor noise sigma 12": (noise(12), 1.0),
    "JPEG quality 30": (_jpeg(30), 1.0),
    "defocus (blur 0.25 µm)": (defocus(0.25), 1.0),
    "defocus (blur 0.5 µm)": (defocus(0.5), 1.0),
    "camera saturation x0.6": (camera_tone(saturation=0.6), 1.0),
    "camera saturation x1.5": (camera_tone(saturation=1.5), 1.0),
    "camera contrast x1.3": (camera_tone(contrast=1.3), 1.0),
    "camera contrast x0.75": (camera_tone(contrast=0.75), 1.0),
    "camera gamma 0.7": (camera_tone(gamma=0.7), 1.0),
    "camera gamma 1.4": (camera_tone(gamma=1.4), 1.0),
    "dim lamp (x0.45)": (cast((0.45, 0.45, 0.45)), 1.0),
    "vignetting (corners 60%)": (uneven(0.6), 1.0),
    "lamp off-centre (dimmest 75%)": (uneven(0.75, (0.3, 0.2)), 1.0),
    "lamp off-centre (dimmest 60%)": (uneven(0.6, (0.3, 0.2)), 1.0),
    "lamp off-centre sideways (dimmest 60%)": (uneven(0.6, (-0.4, 0.0)), 1.0),
}


def measure(annotations: list[Path], images: Path, change: Callable[[np.ndarray], np.ndarray], zoom: float,
            splitter: CellSplitter | None = None, blue_threshold: int = SegmentationSettings.blue_threshold) -> dict:
    """Recall and precision on the annotated frames, each changed by ``change`` (``tests/test_segmentation.py``
    holds the device to these on BCCD as recorded and under the colour shifts). ``blue_threshold``: the
    nucleus rule's ``segmentation.blue_threshold``, as a lab with another stain may set it."""
    settings = SegmentationSettings(um_per_px=BCCD_UM_PER_PX / zoom, blue_threshold=blue_threshold)
    interior = matched = on_cell = elsewhere = 0
    for xml_path in annotations:
        image = change(read_rgb(images / f"{xml_path.stem}.jpg"))
        truth = [tuple(round(v * zoom) for v in box) for box in wbc_boxes(xml_path)]
        height, width = image.shape[:2]
        margin = BORDER * zoom
        inner = {k for k, t in enumerate(truth) if t[0] > margin and t[1] > margin and t[2] < width - margin and t[3] < height - margin}
        hit: set[int] = set()
        for cell in find_cells(image, settings, splitter):
            x, y, w, h = cell.bbox
            overlaps = [iou((x, y, x + w, y + h), t) for t in truth]
            if not any(o > 0.3 for o in overlaps):
                elsewhere += 1
                continue
            on_cell += 1
            free = [k for k, o in enumerate(overlaps) if k not in hit and o > 0.5]
            if free and judge(image, cell, settings.um_per_px, settings).classify:
                hit.add(free[0])
        interior += len(inner)
        matched += len(inner & hit)
    return {"recall": round(matched / interior, 3), "found": matched, "interior_white_cells": interior,
            "precision": round(on_cell / max(on_cell + elsewhere, 1), 3), "found_on_no_white_cell": elsewhere}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--step", type=int, default=3, help="every N-th BCCD frame")
    parser.add_argument("--blue-threshold", type=int, default=SegmentationSettings.blue_threshold,
                        help="segmentation.blue_threshold to measure (default: the device's, %(default)s; 30 is the "
                             "README's setting for a redder stain)")
    parser.add_argument("--noise-sweep", action="store_true", help="camera noise of every strength and grain instead, on "
                        "sharp frames and frames blurred by 0.5 µm (NOISE_SWEEP)")
    args = parser.parse_args()
    changes = NOISE_SWEEP if args.noise_sweep else PERTURBATIONS
    started = time.perf_counter()
    bccd = args.data / "bccd"
    annotations = sorted((bccd / "Annotations").glob("*.xml"))[::args.step]
    report = {"frames": len(annotations), "blue_threshold": args.blue_threshold,
              "perturbations": {name: measure(annotations, bccd / "JPEGImages", change, zoom, blue_threshold=args.blue_threshold)
                                for name, (change, zoom) in changes.items()}}
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
