"""``trainer splitter``: teach the device's cell splitter (``edge.splitter``) on composed clusters.

Why composed: no smear in ../shared has its touching cells outlined. Clusters of 1-8 real cells
(C-NMC cells cut on black, smear cells outlined by the device's own segmentation) are placed touching
and overlapping on real smear fields (PBC images with their white cell painted out; BCCD stays out,
it is where the device is measured), at ``FIELD_UM_PER_PX``, then reduced to the splitter's scale as a
camera frame is. Which cell owns each pixel is known, so the inner-distance target is exact.

Only half of the cells (``trainer.clusters.half`` == 0) are used; the run measures the model on
clusters of the other half, and the tests and ``bench_clusters.py`` measure the device on them too.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from edge.console import progress
from edge.errors import DataError
from edge.preprocessing import read_rgb
from edge.segmentation import SegmentationSettings
from edge.splitter import CONTRACT, SIDE_MULTIPLE, UM_PER_PX, cells_from_distance
from trainer.clusters import CutCell, cut_cnmc, cut_smear_cell, half, inner_distance, matches, place_cluster
from trainer.compose import smear_background
from trainer.dataset import LABELS, Sample

#: Clusters are composed at this scale (a 12 µm cell is 80 px) and reduced to ``UM_PER_PX``.
FIELD_UM_PER_PX = 0.15
#: A composed field, 108 x 81 µm: room for eight touching cells.
FIELD_SIZE = (720, 540)
#: Cluster sizes, one to eight cells (a single cell must stay one).
SIZES = tuple(range(1, 9))
#: Training windows (splitter pixels), cut at random from each composed field.
WINDOW = 160
#: Painted out with this rim: a large cell's pale cytoplasm reaches past its stained mask, and a ghost
#: of it left on a field would be a white cell the target calls background.
FIELD_MARGIN_UM = 4.0
#: A field keeps less than this share of blue-violet pixels (B - R > 20): no nucleus or cytoplasm left.
FIELD_MAX_STAINED = 0.003
#: Eosinophils' orange granules outlive the painting (their cytoplasm is not blue): not used as fields.
NOT_FIELDS = ("eosinophil",)
MODEL_FILE = "splitter.keras"
CALIBRATION_FILE = "calibration_fields.npz"
METRICS_FILE = "splitter.json"


def cell_pool(samples: Sequence[Sample], count: int, part: int, seed: int) -> list[CutCell]:
    """Up to ``count`` cells of half ``part``: C-NMC cells and smear cells alike (as many of each as there are)."""
    rng = np.random.default_rng(seed)
    cnmc = [s for s in samples if s.cell_type in LABELS and half(s.path) == part]
    smear = [s for s in samples if s.cell_type not in LABELS and half(s.path) == part]
    chosen = [group[i] for group in (cnmc, smear) if group
              for i in rng.choice(len(group), min(len(group), count // (1 + bool(cnmc and smear))), replace=False)]
    pool = []
    for sample in progress(chosen, desc="cut cells", unit="cell"):
        try:
            cut = (cut_cnmc if sample.cell_type in LABELS else cut_smear_cell)(sample.path, sample.um_per_px, FIELD_UM_PER_PX)
        except DataError:
            continue  # an unreadable image: the trainer's loaders report those
        if cut is not None and cut.mask.any():
            pool.append(cut)
    return pool


def smear_fields(samples: Sequence[Sample], count: int, seed: int) -> list[np.ndarray]:
    """Smear tiles without white cells at ``FIELD_UM_PER_PX``: smear images with their cell painted out."""
    smear = [s for s in samples if s.cell_type not in LABELS + NOT_FIELDS]
    if not smear:
        raise DataError("the splitter needs smear images for its fields: add a --data source in the cell-type layout "
                        "(e.g. ../shared/data/pbc-normal)")
    rng = np.random.default_rng(seed)
    tiles = []
    for index in progress(rng.choice(len(smear), min(count, len(smear)), replace=False), desc="smear fields", unit="image"):
        sample = smear[index]
        try:
            background = smear_background(read_rgb(sample.path), sample.um_per_px, FIELD_MARGIN_UM)
        except DataError:
            continue  # an unreadable image: the trainer's loaders report those
        if background is not None and (background[..., 2].astype(np.int16) - background[..., 0] > 20).mean() < FIELD_MAX_STAINED:
            factor = sample.um_per_px / FIELD_UM_PER_PX
            tiles.append(cv2.resize(background, None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA))
    if not tiles:
        raise DataError(f"none of {min(count, len(smear))} smear images gave a field free of white cells; "
                        "give a smear source whose images show a white cell among red cells (e.g. ../shared/data/pbc-normal)")
    return tiles


def field(rng: np.random.Generator, tiles: list[np.ndarray]) -> np.ndarray:
    """A ``FIELD_SIZE`` smear field tiled from random tiles, each flipped at random."""
    width, height = FIELD_SIZE
    canvas = np.empty((height, width, 3), np.uint8)
    y = 0
    while y < height:
        x, row = 0, 0
        while x < width:
            tile = tiles[rng.integers(len(tiles))][:, ::rng.choice([-1, 1])]
            h, w = min(tile.shape[0], height - y), min(tile.shape[1], width - x)
            canvas[y:y + h, x:x + w] = tile[:h, :w]
            x, row = x + w, max(row, h)
        y += row
    return canvas


def compose(rng: np.random.Generator, pool: list[CutCell], tiles: list[np.ndarray], count: int,
            absorb_share: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``count`` clusters as the splitter sees them: images (N x H x W x 3 uint8), targets (N x H x W
    float16) and which placed cell owns each pixel (N x H x W uint8, 0 = none). ``absorb_share`` of them
    are composed with cells that filter the light (``trainer.clusters.paste``), the rest pasted."""
    factor = FIELD_UM_PER_PX / UM_PER_PX
    size = (round(FIELD_SIZE[0] * factor) // SIDE_MULTIPLE * SIDE_MULTIPLE, round(FIELD_SIZE[1] * factor) // SIDE_MULTIPLE * SIDE_MULTIPLE)
    images = np.empty((count, size[1], size[0], 3), np.uint8)
    targets = np.empty((count, size[1], size[0]), np.float16)
    owners = np.empty((count, size[1], size[0]), np.uint8)
    for index in progress(range(count), desc="compose clusters", unit="cluster"):
        frame = field(rng, tiles)
        owner = np.zeros(frame.shape[:2], np.int32)
        cells = [pool[i] for i in rng.integers(len(pool), size=SIZES[index % len(SIZES)])]
        cells = [CutCell(c.rgb[::flip], c.mask[::flip]) for c, flip in zip(cells, rng.choice([-1, 1], len(cells)))]
        place_cluster(rng, cells, frame, owner, absorb=bool(rng.random() < absorb_share))
        images[index] = cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
        owners[index] = cv2.resize(owner, size, interpolation=cv2.INTER_NEAREST)
        targets[index] = inner_distance(owners[index])
    return images, targets, owners


def build_model():
    """A ~45k-parameter fully convolutional net: raw RGB bytes in, inner distance (0..1) out, for any
    height and width that are multiples of 4. Dilated convolutions at quarter scale see ~40 µm: a
    cluster's neighbours. Upsampling is a strided transposed convolution: it converts to int8 TFLite
    with the image size left open (``UpSampling2D`` followed by a convolution does not)."""
    import keras
    from keras import layers

    def conv(x, filters: int, dilation: int = 1):
        x = layers.Conv2D(filters, 3, padding="same", dilation_rate=dilation, use_bias=False)(x)
        return layers.ReLU()(layers.BatchNormalization()(x))

    def up(x, filters: int):
        return layers.ReLU()(layers.Conv2DTranspose(filters, 2, strides=2, padding="same")(x))

    image = keras.Input((None, None, 3), name="region")
    full = conv(layers.Rescaling(1 / 255)(image), 8)
    halfway = conv(conv(layers.MaxPooling2D(padding="same")(full), 16), 16)
    quarter = conv(layers.MaxPooling2D(padding="same")(halfway), 32)
    for dilation in (2, 4, 8):
        quarter = conv(quarter, 32, dilation)
    merged = conv(layers.Concatenate()([up(quarter, 16), halfway]), 16)
    merged = conv(layers.Concatenate()([up(merged, 8), full]), 8)
    return keras.Model(image, layers.Conv2D(1, 1, activation="sigmoid", name="inner_distance")(merged), name="splitter")


def batches(images: np.ndarray, targets: np.ndarray, batch: int, seed: int, stain: bool = False):
    """Random windows, flipped and transposed. ``stain``: each image also takes what another lab's
    microscope and stain change (``restain``) and a scale error; otherwise only each channel's gain is jittered."""
    rng = np.random.default_rng(seed)
    height, width = images.shape[1:3]
    while True:
        picks = rng.integers(len(images), size=batch)
        # ``stain`` also takes a scale error of +-10% (a calibration's): a window of another size, brought to WINDOW.
        side = min(height, width, int(round(WINDOW * rng.uniform(0.9, 1.1)))) if stain else WINDOW
        y, x = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
        image = images[picks, y:y + side, x:x + side]
        target = targets[picks, y:y + side, x:x + side].astype(np.float32)
        if side != WINDOW:
            image = np.stack([cv2.resize(i, (WINDOW, WINDOW), interpolation=cv2.INTER_AREA) for i in image])
            target = np.stack([cv2.resize(t, (WINDOW, WINDOW), interpolation=cv2.INTER_LINEAR) for t in target])
        image, target = image.astype(np.float32), target[..., None]
        if rng.random() < 0.5:
            image, target = image[:, ::-1], target[:, ::-1]
        if rng.random() < 0.5:
            image, target = image.transpose(0, 2, 1, 3), target.transpose(0, 2, 1, 3)
        if stain:
            image = np.stack([restain(i, rng) for i in image])
        else:
            image = np.clip(image * rng.uniform(0.85, 1.15, (batch, 1, 1, 3)), 0, 255)
        yield np.ascontiguousarray(image), np.ascontiguousarray(target)


def restain(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One image (float 0..255) as another lab might show it: white balance (each channel's gain),
    exposure and contrast, stain hue and strength (chroma turned and scaled about its grey), defocus
    and sensor noise. Why: the splitter learns on PBC fields and must hold on a microscope it never saw."""
    grey = image.mean(axis=2, keepdims=True)
    chroma = image - grey
    angle = rng.uniform(-0.25, 0.25)  # radians of hue, in the plane of the chroma
    axis = np.ones(3) / np.sqrt(3)
    cos, sin = np.cos(angle), np.sin(angle)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    turn = cos * np.eye(3) + sin * cross + (1 - cos) * np.outer(axis, axis)  # Rodrigues: about the grey axis
    image = grey + rng.uniform(0.6, 1.4) * chroma @ turn.T
    image = image * rng.uniform(0.85, 1.15, 3)
    mean = image.mean()
    image = (image - mean) * rng.uniform(0.8, 1.2) + mean * rng.uniform(0.85, 1.15)
    sigma = rng.uniform(0.0, 1.2)
    if sigma > 0.3:
        image = cv2.GaussianBlur(image, (0, 0), sigma)
    image = image + rng.normal(0, rng.uniform(0, 4), image.shape)
    return np.clip(image, 0, 255)


def weighted_error(target, predicted):
    """Squared error, white-cell pixels counting five times: they are a few per cent of a field."""
    import keras

    weight = 1.0 + 4.0 * keras.ops.cast(target > 0, "float32")
    return keras.ops.mean(weight * keras.ops.square(target - predicted))


def found_alone(model, images: np.ndarray, owners: np.ndarray) -> dict:
    """Held-out clusters: how many placed cells the model's cells match one to one (box IoU >= 0.5)."""

    def box(mask: np.ndarray) -> tuple[int, int, int, int]:
        return cv2.boundingRect(mask.astype(np.uint8))

    cells = hits = 0
    predicted = model.predict(images, batch_size=8, verbose=0)[..., 0]
    for distance, owner in zip(predicted, owners):
        found = [box(m) for m in cells_from_distance(distance, SegmentationSettings.cell_diameter_um / UM_PER_PX)]
        truth = [box(owner == label) for label in range(1, int(owner.max()) + 1) if (owner == label).any()]
        hits += len(matches(truth, found))
        cells += len(truth)
    return {"clusters": len(images), "cells": cells, "found_alone": hits, "rate": round(hits / max(cells, 1), 3)}


#: The shipped splitter's recipe, and `trainer splitter`'s defaults: composed training clusters, epochs, and the
#: distinct cells they are composed from.
CLUSTERS, EPOCHS, CELLS = 4800, 24, 1500


def train_splitter(samples: Sequence[Sample], out: Path, *, clusters: int = CLUSTERS, epochs: int = EPOCHS,
                   steps: int = 100, batch: int = 8, seed: int = 0, cells: int = CELLS, fields: int = 150,
                   absorb_share: float = 0.0, restain: bool = False) -> dict:
    """Compose, train and write ``out/`` (the model, calibration fields for ``quantize splitter``, metrics)."""
    import keras

    started = time.time()
    keras.utils.set_random_seed(seed)
    tiles = smear_fields(samples, fields, seed)
    train_pool, test_pool = cell_pool(samples, cells * 4 // 5, 0, seed), cell_pool(samples, cells // 5, 1, seed)
    if len(train_pool) < 8 or len(test_pool) < 2:
        raise DataError(f"too few cells to compose clusters from ({len(train_pool)} + {len(test_pool)}); "
                        "give C-NMC and smear sources with --data")
    rng = np.random.default_rng(seed)
    images, targets, _ = compose(rng, train_pool, tiles, clusters, absorb_share)
    test_images, _, test_owners = compose(rng, test_pool, tiles, max(len(SIZES), clusters // 24), absorb_share)
    model = build_model()
    model.compile(keras.optimizers.Adam(2e-3), loss=weighted_error)
    history = model.fit(batches(images, targets, batch, seed, restain), steps_per_epoch=steps, epochs=epochs,
                        verbose=1 if sys.stderr.isatty() else 2)
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / MODEL_FILE)
    np.savez_compressed(out / CALIBRATION_FILE, images=images[:: max(1, clusters // 64)], held_out=test_images)
    metrics = {"contract": CONTRACT, "um_per_px": UM_PER_PX, "field_um_per_px": FIELD_UM_PER_PX,
               "cells": {"train": len(train_pool), "held_out": len(test_pool)}, "clusters": clusters, "absorb_share": absorb_share, "restain": restain,
               "epochs": epochs, "steps_per_epoch": steps, "batch": batch, "seed": seed,
               "loss": [round(float(v), 5) for v in history.history["loss"]],
               "held_out": found_alone(model, test_images, test_owners),
               "parameters": int(model.count_params()), "seconds": round(time.time() - started, 1)}
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
