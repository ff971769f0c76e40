"""The source probe (benchmarks/bench_source_probe.py) must be able to say both "the labs look alike"
and "the lab is visible": chance on cells drawn alike, near 1 on cells that differ in one statistic."""

import numpy as np

from benchmarks.bench_source_probe import FEATURES, grouped_auc, input_features


def _cells(rng: np.random.Generator, count: int, green_shift: int) -> np.ndarray:
    """Round cells on black, noisy colour; ``green_shift`` moves the green channel only."""
    crops = np.zeros((count, 48, 48, 3), np.uint8)
    yy, xx = np.mgrid[:48, :48]
    disc = (yy - 24) ** 2 + (xx - 24) ** 2 < 15 ** 2
    for crop in crops:
        pixels = rng.normal((120, 90 + green_shift, 160), 18, (int(disc.sum()), 3))
        crop[disc] = np.clip(pixels, 1, 255).astype(np.uint8)
    return crops


def test_the_probe_finds_a_visible_lab_and_not_an_invisible_one():
    rng = np.random.default_rng(0)
    same = input_features(np.concatenate([_cells(rng, 60, 0), _cells(rng, 60, 0)]))
    shifted = input_features(np.concatenate([_cells(rng, 60, 0), _cells(rng, 60, 12)]))
    assert same.shape == (120, len(FEATURES))
    labels = np.array([1] * 60 + [0] * 60)
    groups = [f"g{i // 3}" for i in range(120)]  # three cells per "donor", never split across folds
    assert abs(grouped_auc(same, labels, groups, "trees") - 0.5) < 0.2
    assert grouped_auc(shifted, labels, groups, "trees") > 0.95
    assert grouped_auc(shifted, labels, groups, "linear") > 0.95
