"""The crop preprocessing contract shared by trainer, quantizer and device.

A model learns from C-NMC crops: one white cell, segmented, centred on a black square.
Whatever the source (a C-NMC file, a cell cut from a camera frame), the model input is
made by exactly this code, named and versioned in the model bundle so a device can refuse
a model that expects something else.

Pixels stay uint8 RGB in [0, 255]; scaling to [0, 1] happens inside the model (a
Rescaling layer), so an int8 model with uint8 input takes these bytes unchanged.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from edge.errors import DataError

PREPROCESSING_NAME = "cnmc-square-area-v1"
COLOR_ORDER = "RGB"


def square_pad(image: np.ndarray) -> np.ndarray:
    """Pad to a square with black, the C-NMC background, keeping the cell centred."""
    height, width = image.shape[:2]
    side = max(height, width)
    if height == width:
        return image
    top = (side - height) // 2
    left = (side - width) // 2
    return cv2.copyMakeBorder(
        image, top, side - height - top, left, side - width - left, cv2.BORDER_CONSTANT, value=0
    )


def to_model_input(image_rgb: np.ndarray, size: int) -> np.ndarray:
    """Square-pad and area-resize an RGB uint8 crop to ``size`` x ``size`` x 3 uint8."""
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.size == 0:
        raise DataError(f"crop has shape {image_rgb.shape}; expected a non-empty HxWx3 RGB image")
    square = square_pad(image_rgb)
    if square.shape[0] == size:
        return np.ascontiguousarray(square, dtype=np.uint8)
    interpolation = cv2.INTER_AREA if square.shape[0] > size else cv2.INTER_LINEAR
    return cv2.resize(square, (size, size), interpolation=interpolation).astype(np.uint8)


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as RGB uint8; a clear error when it cannot be decoded."""
    data = np.fromfile(str(path), dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None or image.size == 0:
        raise DataError(f"{path}: not a readable image (empty or corrupt file); replace or remove it")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def load_crop(path: str | Path, size: int) -> np.ndarray:
    """A file on disk, made into model input exactly as the device makes it."""
    return to_model_input(read_rgb(path), size)


#: In C-NMC crops the cell's bounding box spans about half the crop (median 0.51 of the side,
#: measured on cnmc-dev; 5-95%: 0.37-0.65) because every crop has the same physical field. A
#: cell cut from a camera frame gets a window of ``typical WBC diameter / CNMC_CELL_FRACTION``
#: frame pixels: a fixed physical field per microscope, so cell size still means what it meant
#: in training.
CNMC_CELL_FRACTION = 0.51


def crop_cell(frame_rgb: np.ndarray, mask: np.ndarray, bbox: tuple[int, int, int, int], window: int, size: int) -> np.ndarray:
    """A C-NMC-style model input for one cell: the cell's pixels (``mask``: bool, bbox-sized) on
    black, centred in a ``window`` x ``window`` field (at least the bbox), resized to ``size``."""
    x, y, w, h = bbox
    window = max(window, w, h)
    left, top = (window - w) // 2, (window - h) // 2
    out = np.zeros((window, window, 3), np.uint8)
    cv2.copyTo(frame_rgb[y:y + h, x:x + w], mask.view(np.uint8), out[top:top + h, left:left + w])
    return to_model_input(out, size)
