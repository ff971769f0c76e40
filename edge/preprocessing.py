"""The crop contract shared by trainer, quantizer and device: a cell in micrometres, colour normalised.

Why micrometres: a blast is told from a lymphocyte partly by its size, and pixel size changes with
the objective, camera and binning. So the model always sees a cell at the same physical scale
(``um_per_px`` of the model input), on black, centred in a fixed field of view, whatever the
microscope; the frame's own scale comes from config or from ``edge calibrate`` (red cells).

Why colour normalisation: stains, lamps and white balance differ from lab to lab, and C-NMC's
crops were stain-normalised by its authors, so raw colour tells the lab rather than the cell.
Each cell's pixels are mapped, in CIELAB, to a reference mean and spread (Reinhard et al. 2001,
per cell): hue and contrast *within* the cell survive, the lab's cast does not.

The contract is named and versioned (``PREPROCESSING_NAME``) and its parameters travel in the model
bundle, so a device refuses a model that expects something it does not make.

Pixels stay uint8 RGB in [0, 255]; scaling to [0, 1] happens inside the model, so an int8 model with
uint8 input takes these bytes unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import cv2
import numpy as np

from edge.errors import BundleError, DataError

PREPROCESSING_NAME = "cell-um-lab-v2"
COLOR_ORDER = "RGB"


@dataclass(frozen=True)
class CropContract:
    """What the model's input means. Defaults are the shipped model's; a bundle carries its own."""

    #: Model input side in pixels.
    size: int = 96
    #: Micrometres per model-input pixel: 96 px x 0.25 µm = a 24 µm field, room for a monocyte.
    #: Coarser than every source's native scale (C-NMC ~0.056, PBC ~0.103, BCCD ~0.083 µm/px), so every
    #: source is downsampled and the sharpness of the lab's optics is equalised.
    um_per_px: float = 0.25
    #: Reference CIELAB mean and spread of a cell's pixels (OpenCV 8-bit LAB units): the mean of the
    #: per-cell statistics of 400 training cells, C-NMC and PBC weighted alike (C-NMC alone: L 50 +- 11,
    #: PBC alone: L 87 +- 30; so different that raw colour would name the lab).
    lab_mean: tuple[float, float, float] = (68.0, 160.0, 97.0)
    lab_std: tuple[float, float, float] = (20.0, 7.2, 8.4)
    #: Gaussian blur (sigma, model pixels) after resampling: one effective resolution for every lab's
    #: optics. C-NMC crops are soft and PBC/BCCD ones sharp; without it, sharpness tells the source.
    blur_sigma_px: float = 1.2
    name: str = PREPROCESSING_NAME

    @property
    def field_um(self) -> float:
        return self.size * self.um_per_px

    def to_manifest(self) -> dict[str, Any]:
        record = asdict(self)
        record["lab_mean"], record["lab_std"] = list(self.lab_mean), list(self.lab_std)
        return {"name": record.pop("name"), "params": record}

    @classmethod
    def from_manifest(cls, record: Mapping[str, Any], where: str) -> "CropContract":
        """The contract a bundle declares; ``BundleError`` (one line) when this code cannot make it."""
        name = record.get("name") if isinstance(record, Mapping) else None
        if name != PREPROCESSING_NAME:
            raise BundleError(f"{where}: the model expects preprocessing {name!r}, this leukoscope makes "
                              f"{PREPROCESSING_NAME!r}; re-export the model with this version or upgrade leukoscope")
        params = record.get("params")
        try:
            contract = cls(size=int(params["size"]), um_per_px=float(params["um_per_px"]),
                           lab_mean=tuple(float(v) for v in params["lab_mean"]),
                           lab_std=tuple(float(v) for v in params["lab_std"]),
                           blur_sigma_px=float(params["blur_sigma_px"]))
        except (KeyError, TypeError, ValueError):
            raise BundleError(f"{where}: preprocessing params must give size, um_per_px, lab_mean, lab_std and blur_sigma_px; "
                              "re-export the bundle") from None
        if not (16 <= contract.size <= 1024 and 0.01 <= contract.um_per_px <= 5.0 and len(contract.lab_mean) == 3
                and len(contract.lab_std) == 3 and all(s > 0 for s in contract.lab_std) and 0 <= contract.blur_sigma_px <= 5):
            raise BundleError(f"{where}: preprocessing params {params} are out of range; re-export the bundle")
        return contract


DEFAULT_CONTRACT = CropContract()


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """The cell's outline filled: pale granules or vacuoles trimmed out by segmentation must not
    show as black holes (C-NMC's masks have none, so holes would tell the source)."""
    mask8 = mask.astype(np.uint8)
    contours, _ = cv2.findContours(mask8, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = np.zeros_like(mask8)
    cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
    return filled.astype(bool)


_BYTES = np.arange(256, dtype=np.uint8).reshape(256, 1)


def normalise_colour(cell_rgb: np.ndarray, mask: np.ndarray, contract: CropContract) -> np.ndarray:
    """Map the masked pixels' CIELAB mean and spread to the contract's reference; black outside."""
    inside = mask.astype(bool)
    if inside.sum() < 4:
        return np.zeros_like(cell_rgb)
    lab = cv2.cvtColor(cell_rgb, cv2.COLOR_RGB2LAB)
    mean, std = (v.reshape(3) for v in cv2.meanStdDev(lab, mask=inside.view(np.uint8)))
    gain = np.float32(contract.lab_std) / np.maximum(std, 1.0).astype(np.float32)
    offset = np.float32(contract.lab_mean) - mean.astype(np.float32) * gain
    # The per-channel map applied to the 256 possible bytes, then looked up: the same arithmetic as on
    # every pixel (float32 multiply, add, clip, truncate), at a fraction of the cost.
    table = np.clip(_BYTES * gain + offset, 0, 255).astype(np.uint8).reshape(256, 1, 3)
    out = cv2.cvtColor(cv2.LUT(lab, table), cv2.COLOR_LAB2RGB)
    # A normalised pixel must never read as background (black): the model tells cell from field by it.
    return cv2.bitwise_and(cv2.max(out, (1, 1, 1, 0)), (255, 255, 255, 0), mask=inside.view(np.uint8))


def crop_cell(frame_rgb: np.ndarray, mask: np.ndarray, bbox: tuple[int, int, int, int], frame_um_per_px: float,
              contract: CropContract = DEFAULT_CONTRACT) -> np.ndarray:
    """The model input for one cell: its pixels (``mask``: bool, bbox-sized) on black, centred in the
    contract's field of view, resampled from ``frame_um_per_px`` to the contract's scale and colour
    normalised. A cell larger than the field is cut at the field's edge (the scale is never bent)."""
    if frame_rgb.ndim != 3 or frame_rgb.shape[2] != 3 or frame_rgb.size == 0:
        raise DataError(f"frame has shape {frame_rgb.shape}; expected a non-empty HxWx3 RGB image")
    if not frame_um_per_px > 0:
        raise DataError(f"frame scale {frame_um_per_px} µm per pixel must be positive; run `edge calibrate`")
    x, y, w, h = bbox
    factor = frame_um_per_px / contract.um_per_px  # model pixels per frame pixel
    out_w, out_h = max(1, round(w * factor)), max(1, round(h * factor))
    interpolation = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
    # Resample first, then normalise: the colour maths runs on the model's few thousand pixels, not on
    # a 12 MP frame's hundreds of thousands per cell. Cell and mask are resampled apart (as separate
    # channels of one image: one pass, each channel on its own) so the cell's edge does not blend with
    # black before its colour statistics are taken.
    region, alpha = frame_rgb[y:y + h, x:x + w], fill_holes(mask).view(np.uint8) * np.uint8(255)
    if region.shape[:2] == alpha.shape:
        layers = cv2.cvtColor(region, cv2.COLOR_RGB2RGBA)  # OpenCV's channel copies are ~10x NumPy's strided ones
        cv2.insertChannel(alpha, layers, 3)
        resampled = cv2.resize(layers, (out_w, out_h), interpolation=interpolation)
        small, small_mask = cv2.cvtColor(resampled, cv2.COLOR_RGBA2RGB), resampled[..., 3] >= 128
    else:  # a box reaching past the frame's edge: the part inside, stretched to the mask's box as before
        small = cv2.resize(region, (out_w, out_h), interpolation=interpolation)
        small_mask = cv2.resize(alpha, (out_w, out_h), interpolation=interpolation) >= 128
    small = normalise_colour(small, small_mask, contract)
    if contract.blur_sigma_px > 0:
        small = cv2.GaussianBlur(small, (0, 0), contract.blur_sigma_px)
    size = contract.size
    canvas = np.zeros((size, size, 3), np.uint8)
    # Centre the cell; clip what spills over the field.
    left, top = (size - out_w) // 2, (size - out_h) // 2
    src_x, src_y = max(0, -left), max(0, -top)
    dst_x, dst_y = max(0, left), max(0, top)
    span_w, span_h = min(out_w - src_x, size - dst_x), min(out_h - src_y, size - dst_y)
    canvas[dst_y:dst_y + span_h, dst_x:dst_x + span_w] = small[src_y:src_y + span_h, src_x:src_x + span_w]
    return canvas


#: Bit depths a camera's deeper frames are saved at (in 16-bit containers: TIFF, PNG).
CAMERA_BIT_DEPTHS = (10, 12, 14, 16)


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as RGB uint8; a clear error when it cannot be decoded. A frame deeper than 8 bits is brought
    to 8 by the smallest of ``CAMERA_BIT_DEPTHS`` that holds its brightest pixel, not by its container's 16 bits: a
    microscope camera saving 12-bit data in a 16-bit TIFF would otherwise read 16 times too dark (a lit BCCD frame
    came out "dark", without cells)."""
    data = np.fromfile(str(path), dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH) if data.size else None
    if image is None or image.size == 0:
        raise DataError(f"{path}: not a readable image (empty or corrupt file); replace or remove it")
    if image.dtype != np.uint8:
        image = _to_8_bits(image)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _to_8_bits(image: np.ndarray) -> np.ndarray:
    """A deeper frame (16-bit, or float) as uint8: floats up to 1 are read as 0-1; anything else by its bit depth."""
    brightest = float(image.max())
    if image.dtype.kind == "f" and brightest <= 1.0:
        full = 1.0
    else:
        bits = next((depth for depth in CAMERA_BIT_DEPTHS if brightest < 2 ** depth), int(np.ceil(np.log2(brightest + 1))))
        full = float(2 ** bits - 1)
    return cv2.convertScaleAbs(image.astype(np.float32), alpha=255.0 / full)
