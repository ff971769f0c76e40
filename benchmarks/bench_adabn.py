"""Does re-estimating batch-norm statistics on a new microscope's unlabelled cells (AdaBN) help?

    python benchmarks/bench_adabn.py --run runs/v3 --bccd ../shared/data/bccd [--shift-seeds 4]

A lab could adapt a model without labelling anything: run its own cells through the network once
and replace every batch-norm layer's moving mean and variance by what those cells give. This
measures whether that should be part of the recipe, on two kinds of "new microscope":

* BCCD (healthy blood, a lab never trained on): adapt on half of its white cells, score the other
  half; every call of ALL there is a false blast.
* The run's own validation patients from C-NMC (new patients, labels known), under one fixed
  lab-wide stain and lamp shift (``trainer.crosslab.stain_shift`` with one seed for all cells, as a
  lab's stain would be): adapt on half of the patients' shifted cells, score the other half's
  ALL sensitivity, normal specificity and AUC, against the same cells scored by the unadapted model.

Both halves are disjoint: the cells that set the statistics are never the cells scored. Prints one
JSON object; nothing is written to the run. Inference only: a minute or two on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
logging.getLogger("tensorflow").setLevel(logging.ERROR)  # retracing notes: each adapted copy is a new model

from trainer.dataset import LABELS, Sample, load_arrays  # noqa: E402
from trainer.run_folder import RunModel, SplitRecord  # noqa: E402


def adapted(model, cells: np.ndarray):
    """A copy of ``model`` whose batch-norm statistics are those of ``cells`` (AdaBN).

    One forward pass in training mode with momentum 0 sets each layer's moving statistics to the
    batch's, and each later layer sees its input normalised by the already-adapted earlier layers,
    which is AdaBN's layer-by-layer definition. Dropout is active in that pass but sits after the last
    batch norm, so it does not change the statistics.
    """
    import keras
    import tensorflow as tf

    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    norms = [layer for layer in clone.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in norms:
        layer.momentum = 0.0
    clone(tf.cast(cells, tf.float32), training=True)
    return clone


def rates(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    from sklearn.metrics import roc_auc_score

    called = scores >= threshold
    out = {"cells": int(len(labels))}
    if np.any(labels == 1):
        out["sensitivity_all"] = round(float(np.mean(called[labels == 1])), 4)
    if np.any(labels == 0):
        out["specificity_normal"] = round(float(np.mean(~called[labels == 0])), 4)
    if len(set(labels.tolist())) == 2:
        out["roc_auc"] = round(float(roc_auc_score(labels, scores)), 4)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("runs/v3"), help="a trainer run folder (model.keras, model.json, split.json)")
    parser.add_argument("--bccd", type=Path, default=Path("../shared/data/bccd"), help="BCCD-layout smear frames")
    parser.add_argument("--shift-seeds", type=int, default=4, help="how many lab-wide stain shifts to try on C-NMC (default 4)")
    args = parser.parse_args(argv)

    import keras

    from trainer.crosslab import bccd_crops, stain_shift
    from trainer.pipeline import predict

    meta = RunModel.read(args.run)
    threshold, contract = meta.threshold, meta.contract
    model = keras.models.load_model(args.run / "model.keras")
    report: dict = {"run": str(args.run), "threshold": threshold}

    if (args.bccd / "JPEGImages").is_dir():
        crops, record = bccd_crops(args.bccd, contract)
        adapt_half, score_half = crops[0::2], crops[1::2]
        before = predict(model, score_half)
        after = predict(adapted(model, adapt_half), score_half)
        report["bccd"] = {**record, "adapt_cells": len(adapt_half), "scored_cells": len(score_half),
                          "false_blast_rate_before": round(float(np.mean(before >= threshold)), 4),
                          "false_blast_rate_after": round(float(np.mean(after >= threshold)), 4),
                          "median_score_before": round(float(np.median(before)), 4),
                          "median_score_after": round(float(np.median(after)), 4)}

    validation = SplitRecord.read(args.run).samples("validation", args.run)
    cnmc = [s for s in validation if s.cell_type in LABELS]  # C-NMC's own cells: ALL blasts and normal B-cells
    patients = sorted({s.patient for s in cnmc})
    adapt_patients = set(patients[0::2])
    shifts = []
    for seed in range(args.shift_seeds):
        def shifted(image: np.ndarray, sample: Sample, seed: int = seed) -> tuple[np.ndarray, float]:
            return stain_shift(image, np.random.default_rng(1000 + seed), strength=1.5), sample.um_per_px
        images, kept = load_arrays(cnmc, contract, transform=shifted if seed else None, progress=False)
        labels = np.array([s.label for s in kept])
        adapt_rows = np.array([s.patient in adapt_patients for s in kept])
        score_images, score_labels = images[~adapt_rows], labels[~adapt_rows]
        before = predict(model, score_images)
        after = predict(adapted(model, images[adapt_rows]), score_images)
        shifts.append({"shift": "none" if seed == 0 else f"stain seed {1000 + seed}, strength 1.5",
                       "adapt_cells": int(adapt_rows.sum()), "before": rates(score_labels, before, threshold),
                       "after": rates(score_labels, after, threshold)})
    report["cnmc_validation_patients"] = {"patients_adapt": sorted(adapt_patients),
                                          "patients_scored": sorted(set(patients) - adapt_patients), "shifts": shifts}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
