"""tf.data input pipeline with augmentation that suits stained single-cell crops.

Images arrive decoded and preprocessed by ``trainer.dataset.load_arrays`` (parallel decode
through the shared preprocessing contract, held in memory as the cache); this module
shuffles, augments, batches and prefetches.

Augmentation keeps the crop contract intact: the background stays black (colour jitter
is applied inside the cell mask only) and the cell stays centred.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

AUTOTUNE = tf.data.AUTOTUNE


def _augment(image: tf.Tensor, label: tf.Tensor, weight: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    size = tf.shape(image)[0]
    image = tf.cast(image, tf.float32) / 255.0
    mask = tf.cast(tf.reduce_max(image, axis=-1, keepdims=True) > 0.03, tf.float32)
    both = tf.concat([image, mask], axis=-1)
    # Orientation carries no meaning on a slide: flips and 90-degree turns.
    both = tf.image.random_flip_left_right(both)
    both = tf.image.random_flip_up_down(both)
    both = tf.image.rot90(both, tf.random.uniform([], 0, 4, dtype=tf.int32))
    # Small scale change (+-10%): the error of a red-cell calibration, and cell size between slides.
    scaled = tf.cast(tf.cast(size, tf.float32) * tf.random.uniform([], 0.9, 1.1), tf.int32)
    both = tf.image.resize(both, (scaled, scaled), method="bilinear")
    both = tf.image.resize_with_crop_or_pad(both, size, size)
    image, mask = both[..., :3], tf.cast(both[..., 3:] > 0.5, tf.float32)
    # Defocus and optics: a random blur (the contract already blurs every source the same way).
    sigma = tf.random.uniform([], 0.0, 1.0)
    taps = tf.range(-2, 3, dtype=tf.float32)
    kernel = tf.exp(-0.5 * tf.square(taps / tf.maximum(sigma, 0.05)))
    kernel = kernel / tf.reduce_sum(kernel)
    image = tf.nn.depthwise_conv2d(image[None], tf.tile(tf.reshape(kernel, [5, 1, 1, 1]), [1, 1, 3, 1]), [1, 1, 1, 1], "SAME")
    image = tf.nn.depthwise_conv2d(image, tf.tile(tf.reshape(kernel, [1, 5, 1, 1]), [1, 1, 3, 1]), [1, 1, 1, 1], "SAME")[0]
    # What colour normalisation leaves of a stain: per-channel gain, brightness, contrast, hue,
    # saturation, and sensor noise.
    image = image * tf.random.uniform([1, 1, 3], 0.92, 1.08)
    image = tf.image.random_brightness(image, 0.06)
    image = tf.image.random_contrast(image, 0.85, 1.15)
    image = tf.image.random_hue(image, 0.03)
    image = tf.image.random_saturation(image, 0.85, 1.15)
    image = image + tf.random.normal(tf.shape(image), stddev=tf.random.uniform([], 0.0, 0.02))
    image = tf.clip_by_value(image, 0.0, 1.0) * mask
    return image * 255.0, label, weight


Targets = np.ndarray | dict[str, np.ndarray]


def dataset(images: np.ndarray, labels: Targets, *, batch_size: int, training: bool, seed: int,
            weights: Targets | None = None) -> tf.data.Dataset:
    """Batches of (image, label, weight); ``weights`` balance sources and cell types (default 1).
    A model with several outputs takes labels and weights as dicts keyed by output name, each label
    array in the dtype its loss wants (float 0/1, or integer class indices)."""
    weights = np.ones(len(images), np.float32) if weights is None else weights
    labels = labels if isinstance(labels, dict) else labels.astype(np.float32)
    weights = {k: v.astype(np.float32) for k, v in weights.items()} if isinstance(weights, dict) else weights.astype(np.float32)
    data = tf.data.Dataset.from_tensor_slices((images, labels, weights))
    if training:
        data = data.shuffle(len(images), seed=seed, reshuffle_each_iteration=True).repeat()
        data = data.map(_augment, num_parallel_calls=AUTOTUNE)
    else:
        data = data.map(lambda x, y, w: (tf.cast(x, tf.float32), y, w), num_parallel_calls=AUTOTUNE)
    return data.batch(batch_size).prefetch(AUTOTUNE)


def predict(model, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Scores in inference mode (batch norm uses its moving statistics, dropout is off)."""
    data = tf.data.Dataset.from_tensor_slices(images).map(lambda x: tf.cast(x, tf.float32)).batch(batch_size)
    return model.predict(data, verbose=0).reshape(-1)
