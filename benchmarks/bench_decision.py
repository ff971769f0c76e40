"""Could the decision rule alone reach the new-patient targets? Threshold rules and test-time
augmentation, re-scored on a `trainer cv` run's own folds (no retraining).

    python benchmarks/bench_decision.py --cv runs/cv-v3-12m [--bccd ../shared/data/bccd]

Each fold's model is scored on the exact validation and test cells its `split.json` records (the
cells are re-cut by today's crop code; a cell the recorded split names but today's segmentation does
not find is left out and counted). For every rule the threshold is chosen on the fold's validation
cells and applied to its test patients' C-NMC cells and to BCCD's white cells (healthy, a lab never
trained on):

* ``youden``: what `trainer fit` does (max sensitivity + specificity - 1, sources and cell types balanced);
* ``sensitivity_0.90`` / ``0.95``: the highest threshold keeping that ALL sensitivity on validation;
* ``youden_sensitivity_x1.5`` / ``x2``: a missed blast weighs 1.5 / 2 false alarms;
* ``youden_type_cap_0.05`` / ``0.03``: Youden, raised until no normal cell type of another lab (PBC's
  lymphocytes, monocytes, ...) is called ALL more often than 5% / 3% on validation;
* ``tta8``: Youden on the mean logit of the 8 flips and quarter turns of each crop (8x the model's cost).

Prints one JSON object: per rule the per-fold and mean C-NMC test metrics and BCCD false-blast rates.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _dihedral(crops: np.ndarray) -> list[np.ndarray]:
    """The 8 flips and quarter turns of N x S x S x 3 crops (a slide has no up or left)."""
    turns = [np.rot90(crops, k, axes=(1, 2)) for k in range(4)]
    return [np.ascontiguousarray(t) for turn in turns for t in (turn, turn[:, :, ::-1])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cv", type=Path, required=True, help="a `trainer cv` output folder")
    parser.add_argument("--bccd", type=Path, default=ROOT.parent / "shared" / "data" / "bccd")
    args = parser.parse_args()

    import keras
    from sklearn.metrics import roc_curve

    from trainer import crosslab
    from trainer import metrics as M
    from trainer.dataset import LABELS
    from trainer.fit import FitConfig, _load, balanced_weights, decision_threshold

    recorded = json.loads((args.cv / "fold_0" / "config.json").read_text())
    config = FitConfig(**{k: recorded[k] for k in FitConfig.__dataclass_fields__ if k in recorded})
    images, samples, *_ = _load([source["path"] for source in recorded["sources"].values()], config)
    where = {str(s.path): i for i, s in enumerate(samples)}
    labels = np.array([s.label for s in samples])
    bccd, _ = crosslab.bccd_crops(args.bccd, config.contract())
    logit = lambda p: np.log(np.clip(p, 1e-6, 1 - 1e-6) / np.clip(1 - p, 1e-6, 1))  # noqa: E731

    rules: dict[str, list[dict]] = {}
    missing = 0
    folds = sorted(args.cv.glob("fold_*"), key=lambda p: int(p.name.split("_")[1]))
    for fold in folds:
        split = json.loads((fold / "split.json").read_text())
        val, test = ([where[r["path"]] for r in split[part]["samples"] if r["path"] in where] for part in ("validation", "test"))
        missing += sum(len(split[part]["samples"]) for part in ("validation", "test")) - len(val) - len(test)
        model = keras.models.load_model(fold / "model.keras")

        def views(crops: np.ndarray) -> np.ndarray:  # 8 x N scores; row 0 is the crop as it is
            return np.stack([model.predict(v.astype(np.float32), batch_size=128, verbose=0).reshape(-1) for v in _dihedral(crops)])

        v, t, b = views(images[val]), views(images[test]), views(bccd)
        val_samples = [samples[i] for i in val]
        weights = balanced_weights(val_samples, config.patient_power)  # as the run chose its threshold
        cnmc = [k for k, i in enumerate(test) if samples[i].cell_type in LABELS]
        fpr, tpr, cuts = roc_curve(labels[val], v[0], sample_weight=weights)
        thresholds = {"youden": M.choose_threshold(labels[val], v[0], weights)[0]}
        for share in (0.90, 0.95):
            thresholds[f"sensitivity_{share:.2f}"] = float(np.quantile(v[0][labels[val] == 1], 1 - share))
        for weight in (1.5, 2.0):
            thresholds[f"youden_sensitivity_x{weight:g}"] = float(cuts[int(np.argmax(weight * tpr - fpr))])
        for cap in (0.05, 0.03):  # what `trainer fit` does (0.05, its default)
            thresholds[f"youden_type_cap_{cap:g}"] = decision_threshold(labels[val], v[0], val_samples, weights, cap)[0]
        scored = {name: (v[0], t[0], b[0], threshold) for name, threshold in thresholds.items()}
        mean = [1 / (1 + np.exp(-logit(x).mean(axis=0))) for x in (v, t, b)]
        scored["tta8"] = (*mean, M.choose_threshold(labels[val], mean[0], weights)[0])
        for name, (_, test_scores, bccd_scores, threshold) in scored.items():
            m = M.compute(labels[test][cnmc], test_scores[cnmc], threshold)
            rules.setdefault(name, []).append({
                "threshold": round(float(threshold), 3), "weighted_f1": round(m["weighted_f1"], 3),
                "sensitivity_all": round(m["sensitivity_all"], 3), "specificity_all": round(m["specificity_all"], 3),
                "roc_auc": round(m["roc_auc"], 3), "bccd_false_blast_rate": round(float(np.mean(bccd_scores >= threshold)), 4)})
        print(f"{fold.name}: scored", file=sys.stderr)
    keys = ("weighted_f1", "sensitivity_all", "specificity_all", "roc_auc", "bccd_false_blast_rate")
    print(json.dumps({"cv": str(args.cv), "folds": len(folds), "cells_not_found_today": missing, "bccd_cells": len(bccd),
                      "rules": {name: {"mean": {k: round(float(np.mean([f[k] for f in per_fold])), 3) for k in keys},
                                       "per_fold": per_fold} for name, per_fold in rules.items()}}, indent=2))


if __name__ == "__main__":
    main()
