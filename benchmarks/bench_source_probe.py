"""Is the "which lab" shortcut still open? A source probe on the model's inputs and on what it learnt.

    python benchmarks/bench_source_probe.py [--run runs/v3] [--data ../shared/data/cnmc-dev ../shared/data/pbc-normal]

C-NMC's normal B-cells and PBC's lymphocytes are both normal lymphoid cells, from two labs. If a
classifier can tell them apart after the crop contract (µm scale, per-cell colour normalisation, one
effective resolution), the preprocessing leaves the lab visible, and a model may learn "looks like C-NMC"
instead of "looks like a blast" (issue #9). Two probes, each scored by ROC AUC under 5-fold grouped
cross-validation (a C-NMC donor, or a PBC image, is never on both sides; 0.5 = the labs look alike):

* ``inputs``: gradient-boosted trees on what survives the contract: masked colour statistics (RGB and
  CIELAB percentiles), the cell's area in µm², and texture (Laplacian variance, gradient magnitude);
* ``model``: logistic regression on the run's pooled features (the layer before its decision).

For scale, the same probes on the task itself (C-NMC blasts vs C-NMC normal B-cells, donors grouped).
The run's model has trained on most of these cells, so its probes say what it encodes, not how it does on
new patients. Cells are cut as `trainer fit` cuts them (``--compose-share``: the share of C-NMC cells put
on a smear first; training's default). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


FEATURES = [f"{space}_{channel}_p{q}" for space, channels in (("rgb", "RGB"), ("lab", "LAB")) for channel in channels
            for q in (10, 25, 50, 75, 90)] + ["area_px", "laplacian_var", "gradient_mean", "gradient_std"]


def input_features(crops: np.ndarray) -> np.ndarray:
    """What a crop shows beyond its shape: colour distribution, size and texture of the cell's pixels."""
    import cv2

    rows = []
    for crop in crops:
        inside = crop.max(axis=2) > 0  # the contract puts the cell on black, and no cell pixel is black
        if inside.sum() < 10:
            inside = np.ones(crop.shape[:2], bool)
        lab = cv2.cvtColor(crop, cv2.COLOR_RGB2LAB)
        grey = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY).astype(np.float32)
        core = cv2.erode(inside.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)  # not the cell's own edge
        core = core if core.sum() >= 10 else inside
        laplacian = cv2.Laplacian(grey, cv2.CV_32F)[core]
        gradient = np.hypot(cv2.Sobel(grey, cv2.CV_32F, 1, 0), cv2.Sobel(grey, cv2.CV_32F, 0, 1))[core]
        colour = [np.percentile(image[..., c][inside], (10, 25, 50, 75, 90)) for image in (crop, lab) for c in range(3)]
        rows.append(np.concatenate([*colour, [inside.sum(), laplacian.var(), gradient.mean(), gradient.std()]]))
    return np.asarray(rows, np.float32)


def grouped_auc(features: np.ndarray, labels: np.ndarray, groups: list[str], kind: str, seed: int = 0) -> float:
    """Out-of-fold ROC AUC of a probe, 5 folds, no group on both sides."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    scores = np.zeros(len(labels))
    for train, test in StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=seed).split(features, labels, groups):
        probe = (HistGradientBoostingClassifier(max_iter=200, random_state=seed) if kind == "trees"
                 else make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1)))
        probe.fit(features[train], labels[train])
        scores[test] = probe.predict_proba(features[test])[:, 1]
    return round(float(roc_auc_score(labels, scores)), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "v3", help="a `trainer fit` run folder")
    parser.add_argument("--data", nargs="+", default=[str(ROOT.parent / "shared" / "data" / n) for n in ("cnmc-dev", "pbc-normal")])
    parser.add_argument("--compose-share", type=float, default=0.5, help="C-NMC cells put on a smear first (training's default 0.5)")
    args = parser.parse_args()

    import keras
    from sklearn.metrics import roc_auc_score

    from trainer.dataset import LABELS
    from trainer.fit import FitConfig, _load
    from trainer.models import POOLED
    from trainer.run_folder import RunModel

    started = time.monotonic()
    config = FitConfig(image_size=RunModel.read(args.run).input_size, compose_share=args.compose_share)
    images, samples, *_ = _load(args.data, config)
    model = keras.models.load_model(args.run / "model.keras")
    pooled = keras.Model(model.inputs, model.get_layer(POOLED).output)

    def probe(positive: list[int], negative: list[int]) -> dict:
        chosen = positive + negative
        crops = images[chosen]
        labels = np.array([1] * len(positive) + [0] * len(negative))
        groups = [samples[i].patient for i in chosen]
        learnt = pooled.predict(crops.astype(np.float32), batch_size=128, verbose=0)
        shown = input_features(crops)
        # Which single input feature tells the two apart best (AUC 1 or 0 alike: a perfect separation).
        alone = {name: float(roc_auc_score(labels, shown[:, k])) for k, name in enumerate(FEATURES)}
        strongest = sorted(alone.items(), key=lambda item: -abs(item[1] - 0.5))[:5]
        return {"cells": {"positive": int(labels.sum()), "negative": int(len(labels) - labels.sum())},
                "groups": len(set(groups)),
                "strongest_single_input_features_auc": {name: round(auc, 3) for name, auc in strongest},
                "inputs_auc": grouped_auc(shown, labels, groups, "trees"),
                "model_auc": grouped_auc(learnt.reshape(len(chosen), -1), labels, groups, "linear")}

    cnmc_normal = [i for i, s in enumerate(samples) if s.cell_type in LABELS and s.label == 0]
    cnmc_blast = [i for i, s in enumerate(samples) if s.cell_type in LABELS and s.label == 1]
    pbc_lymphocytes = [i for i, s in enumerate(samples) if s.cell_type == "lymphocyte"]
    report = {
        "run": str(args.run), "compose_share": args.compose_share,
        "source_probe_cnmc_normal_vs_pbc_lymphocyte": probe(cnmc_normal, pbc_lymphocytes),
        "task_probe_cnmc_blast_vs_cnmc_normal": probe(cnmc_blast, cnmc_normal),
    }
    print(json.dumps({**report, "seconds": round(time.monotonic() - started, 1)}, indent=2))


if __name__ == "__main__":
    main()
