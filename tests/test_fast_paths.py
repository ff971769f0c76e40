"""The faster formulations in segmentation, gate and crop give the same bytes as the plain NumPy ones
they replaced (decisions and crops must not move when the code gets faster)."""

from __future__ import annotations

import cv2
import numpy as np

from edge.gate import RED_CELL_BLUE_EXCESS, _red_cell_pixels, median_int, percentile_u8
from edge.preprocessing import DEFAULT_CONTRACT, CropContract, normalise_colour
from edge.segmentation import _stained, brightest, components


def test_percentile_from_histogram_is_numpys() -> None:
    rng = np.random.default_rng(1)
    for trial in range(3000):
        height, width = (int(v) for v in rng.integers(1, 90, 2))
        low = int(rng.integers(0, 255))
        image = rng.integers(low, int(rng.integers(low + 1, 257)), (height, width, 3), dtype=np.uint8)
        q = 95.0 if trial % 2 else float(rng.uniform(0, 100))
        assert percentile_u8(image[..., 1], q) == float(np.percentile(image[..., 1], q))


def test_stained_mask_is_the_numpy_one_for_every_colour() -> None:
    levels = np.arange(256, dtype=np.uint8)
    every = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(4096, 4096, 3)
    red, green, blue = cv2.split(every)
    for threshold, dark_level in ((35, 130), (35 * 0.4, 130), (14.5, 129)):
        dark = (cv2.max(cv2.max(red, green), blue) < dark_level) & (cv2.add(blue, 10) >= red)
        expected = ((cv2.subtract(blue, red) > threshold) | dark).astype(np.uint8)
        assert np.array_equal(_stained(every, threshold, dark_level), expected)
    assert np.array_equal(brightest(every[:64]), every[:64].max(axis=2))


def _normalised_by_numpy(cell: np.ndarray, mask: np.ndarray, contract: CropContract) -> np.ndarray:
    lab = cv2.cvtColor(cell, cv2.COLOR_RGB2LAB)
    mean, std = (v.reshape(3) for v in cv2.meanStdDev(lab, mask=mask.view(np.uint8)))
    gain = np.float32(contract.lab_std) / np.maximum(std, 1.0).astype(np.float32)
    offset = np.float32(contract.lab_mean) - mean.astype(np.float32) * gain
    out = cv2.cvtColor(np.clip(lab * gain + offset, 0, 255).astype(np.uint8), cv2.COLOR_LAB2RGB)
    return np.where(mask[..., None], np.maximum(out, 1), 0).astype(np.uint8)


def test_colour_normalisation_by_lookup_table_is_pixel_by_pixel() -> None:
    rng = np.random.default_rng(0)
    for trial in range(500):
        height, width = (int(v) for v in rng.integers(2, 100, 2))
        cell = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        if trial % 2:  # a low-contrast cell: large gains, clipping at both ends
            cell = (cell // 8 + rng.integers(0, 200)).astype(np.uint8)
        mask = rng.random((height, width)) < max(0.2, rng.random())
        if mask.sum() < 4:
            continue
        assert np.array_equal(normalise_colour(cell, mask, DEFAULT_CONTRACT), _normalised_by_numpy(cell, mask, DEFAULT_CONTRACT))


def _red_cells_by_numpy(crop: np.ndarray, stained: np.ndarray) -> np.ndarray:
    green = crop[..., 1]
    excess = crop[..., 2].astype(np.int16) - crop[..., 0].astype(np.int16)
    bright = green >= np.percentile(green, 95)
    background, field_excess = float(green[bright].mean()), float(np.median(excess[bright]))
    return (green < 0.85 * background) & (excess < field_excess + RED_CELL_BLUE_EXCESS) & ~stained


def test_red_cell_pixels_by_integer_compares_are_numpys() -> None:
    rng = np.random.default_rng(3)
    for trial in range(1500):
        height, width = (int(v) for v in rng.integers(1, 100, 2))
        crop = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        if trial % 2:  # narrow ranges: fractional percentiles, means and medians land between levels
            crop = (crop // int(rng.integers(1, 40)) + rng.integers(0, 200)).astype(np.uint8)
        stained = rng.random((height, width)) < 0.3
        assert np.array_equal(_red_cell_pixels(crop, stained), _red_cells_by_numpy(crop, stained))
    for _ in range(1000):
        values = rng.integers(-255, 256, int(rng.integers(1, 400))).astype(np.int16)
        assert median_int(values, -255, 255) == float(np.median(values))


def test_components_match_opencvs_statistics() -> None:
    rng = np.random.default_rng(4)
    for trial in range(1500):
        height, width = (int(v) for v in rng.integers(1, 200, 2))
        mask = (rng.random((height, width)) < rng.random() * 0.6).astype(np.uint8)
        if trial % 3 == 0:  # blobs, not salt
            mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, np.ones((3, 3), np.uint8))
        if trial % 7 == 0:
            mask[:] = trial % 2
        count, labels, stats, centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
        got = components(mask)
        assert got[0] == count and np.array_equal(got[1], labels)
        assert np.array_equal(got[2][1:], stats[1:]) and np.array_equal(got[3][1:], centroids[1:])
