"""How much a few labelled cells of a new lab help: ``trainer fit --finetune`` with N = 25/50/100 site cells.

    python benchmarks/bench_finetune.py --run runs/v3 [--bccd ../shared/data/bccd] [--out /tmp/bench-finetune] [--n 25 50 100]

What stands in for "a lab the model was not trained on" (no second lab with blasts is at hand):

* its normal cells: BCCD's white cells (healthy smears of a third lab, never trained on), found and cut by the
  device's segmentation and quality gate on the frames (at their scale measured on red cells);
* its blasts: C-NMC blasts of RUN's validation patients (never trained on), every cell under ONE fixed stain
  and lamp shift (``trainer.crosslab.stain_shift`` with one seed: the same shift for all cells, as one lab's
  stain), cut on black as C-NMC provides them. C-NMC's validation side has two blast patients: the fine-tune's
  blasts come from one, the rest of the lab's blasts (the sensitivity) are the other patient's, so the
  after-numbers are on a patient the fine-tune never saw;
* also scored, never fine-tuned on: C-NMC's validation normal B-cells under the same shift (the hard normals).

For each N, N//2 blasts and the rest normal cells are drawn (nested: N=25's cells are among N=50's) and
written exactly as ``edge export-reviews`` writes reviewed cells (36 µm views at 0.125 µm/px, C-NMC names,
``leukoscope-scale.json``), then ``trainer.finetune.finetune`` writes a normal run folder from them. False-blast
rate and sensitivity are measured on the same held-out cells for every N, before (RUN at its threshold) and
after (the fine-tuned run at its threshold). One draw per N: the spread between draws is not measured.

Prints one JSON object; writes ``finetune_curve.png`` and ``result.json`` into ``--out`` and adds the curve to
the largest N's run report.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import cv2  # noqa: E402

from edge.calibration import SCALE_FILE, calibrate  # noqa: E402
from edge.gate import judge  # noqa: E402
from edge.preprocessing import crop_cell, read_rgb  # noqa: E402
from edge.segmentation import SegmentationSettings, find_cells  # noqa: E402
from edge.web.reviews import VIEW_FIELD_UM, VIEW_UM_PER_PX, view_of  # noqa: E402
from trainer.crosslab import iou, stain_shift, wbc_boxes  # noqa: E402

#: The one seed of the "other lab's" stain: every blast gets the same shift.
LAB_STAIN_SEED = 7


def bccd_cells(root: Path, contract) -> tuple[list[np.ndarray], list[bytes], float]:
    """(model inputs as the device cuts them, review views) of BCCD's annotated white cells the gate passes."""
    frames = sorted((root / "JPEGImages").glob("*.jpg"))
    scale = calibrate([read_rgb(p) for p in frames[::max(1, len(frames) // 40)]]).um_per_px
    settings = SegmentationSettings(um_per_px=scale)
    crops, views = [], []
    for path in frames:
        xml = root / "Annotations" / f"{path.stem}.xml"
        if not xml.is_file():
            continue
        image, truth = read_rgb(path), wbc_boxes(xml)
        for cell in find_cells(image, settings):
            x, y, w, h = cell.bbox
            if any(iou((x, y, x + w, y + h), b) > 0.3 for b in truth) and judge(image, cell, scale, settings).classify:
                crops.append(crop_cell(image, cell.mask, cell.bbox, scale, contract))
                views.append(view_of(image, list(cell.bbox), scale))
    return crops, views, float(scale)


def shifted_cells(samples, contract) -> tuple[list[np.ndarray], list[bytes], list]:
    """C-NMC cells under the lab's one stain shift: (model inputs, review views, kept samples)."""
    crops, views, kept = [], [], []
    for sample in samples:
        image = stain_shift(read_rgb(sample.path), np.random.default_rng(LAB_STAIN_SEED))
        pad = int(VIEW_FIELD_UM / sample.um_per_px / 2)  # C-NMC's background is black: extend it, do not mirror the cell
        padded = cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
        cells = find_cells(padded, SegmentationSettings(um_per_px=sample.um_per_px))
        if not cells:
            continue
        h, w = padded.shape[:2]
        cell = min(cells, key=lambda c: (c.bbox[0] + c.bbox[2] / 2 - w / 2) ** 2 + (c.bbox[1] + c.bbox[3] / 2 - h / 2) ** 2)
        crops.append(crop_cell(padded, cell.mask, cell.bbox, sample.um_per_px, contract))
        views.append(view_of(padded, list(cell.bbox), sample.um_per_px))
        kept.append(sample)
    return crops, views, kept


def write_site(folder: Path, blasts: list[tuple[str, bytes]], normals: list[bytes]) -> None:
    """The layout ``edge export-reviews`` writes: {all,hem}/UID_<n>_<k>_1_<label>.jpg and the views' scale."""
    for name in ("all", "hem"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    for k, (patient, view) in enumerate(blasts):
        (folder / "all" / f"UID_{patient}_{k}_1_all.jpg").write_bytes(view)
    for k, view in enumerate(normals):
        (folder / "hem" / f"UID_H1_{k}_1_hem.jpg").write_bytes(view)
    (folder / SCALE_FILE).write_text(json.dumps({"um_per_px": VIEW_UM_PER_PX, "measured_by": "bench_finetune"}) + "\n")


def rate(scores: np.ndarray, threshold: float) -> float:
    return round(float(np.mean(np.asarray(scores) >= threshold)), 4) if len(scores) else None


def plot(curve: list[dict], base: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [row["n"] for row in curve]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, key, title in ((axes[0], "blast_sensitivity", "blast sensitivity (other patient, shifted stain)"),
                             (axes[1], "false_blast_rate", "false-blast rate (BCCD white cells)")):
        axis.plot([0] + n, [base[key]] + [row[key]["after"] for row in curve], "o-", label="fine-tuned")
        axis.axhline(base[key], color="grey", linestyle="--", label="before (base run)")
        if key == "false_blast_rate":
            axis.plot([0] + n, [base["shifted_normal_b_cells"]] + [row["shifted_normal_b_cells"]["after"] for row in curve],
                      "s-", label="C-NMC normal B-cells, shifted (not fine-tuned on)")
            axis.axhline(base["shifted_normal_b_cells"], color="grey", linestyle=":")
        axis.set_xlabel("site cells labelled (N)")
        axis.set_title(title, fontsize=10)
        axis.set_ylim(0, 1.02)
        axis.set_xticks([0] + n)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="base run folder (not modified)")
    parser.add_argument("--bccd", type=Path, default=ROOT.parent / "shared" / "data" / "bccd")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-finetune"))
    parser.add_argument("--n", type=int, nargs="+", default=[25, 50, 100])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import keras

    from trainer import pipeline
    from trainer.finetune import FinetuneConfig, finetune, read_base

    started = time.monotonic()
    run = read_base(args.run)
    contract, threshold = run.model.contract, run.model.threshold
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    rng = np.random.default_rng(args.seed)

    normal_crops, normal_views, bccd_scale = bccd_cells(args.bccd, contract)
    val = run.split.samples("validation", run.folder)
    blast_patients = sorted({s.patient for s in val if s.cell_type == "all"})
    tune_patient = max(blast_patients, key=lambda p: sum(s.patient == p for s in val))  # the most cells to draw from
    blast_crops, blast_views, blast_kept = shifted_cells([s for s in val if s.cell_type == "all"], contract)
    hem_crops, _, hem_kept = shifted_cells([s for s in val if s.cell_type == "hem"], contract)

    biggest = max(args.n)
    normal_order = rng.permutation(len(normal_crops))
    normal_pool, normal_rest = normal_order[:biggest - biggest // 2], normal_order[biggest - biggest // 2:]
    tune_blasts = rng.permutation([i for i, s in enumerate(blast_kept) if s.patient == tune_patient])
    rest_blasts = np.array([i for i, s in enumerate(blast_kept) if s.patient != tune_patient])
    if len(tune_blasts) < biggest // 2 or not len(rest_blasts):
        raise SystemExit(f"bench_finetune: patient {tune_patient} gives {len(tune_blasts)} blasts (need {biggest // 2}) "
                         f"and the other patients {len(rest_blasts)}; lower --n")

    eval_normal = np.stack([normal_crops[i] for i in normal_rest])
    eval_blast = np.stack([blast_crops[i] for i in rest_blasts])
    eval_hem = np.stack(hem_crops)
    base_model = keras.models.load_model(run.folder / "model.keras")
    score = lambda model: {k: pipeline.predict(model, v) for k, v in  # noqa: E731
                           (("normal", eval_normal), ("blast", eval_blast), ("hem", eval_hem))}
    before = score(base_model)
    base = {"threshold": threshold, "blast_sensitivity": rate(before["blast"], threshold),
            "false_blast_rate": rate(before["normal"], threshold), "shifted_normal_b_cells": rate(before["hem"], threshold)}

    curve = []
    for n in sorted(args.n):
        site = args.out / f"site-{n}"
        write_site(site, [(tune_patient, blast_views[i]) for i in tune_blasts[:n // 2]],
                   [normal_views[i] for i in normal_pool[:n - n // 2]])
        t0 = time.monotonic()
        result = finetune(run.folder, [site], args.out / f"run-{n}",
                          FinetuneConfig(epochs=args.epochs, seed=args.seed))
        seconds = time.monotonic() - t0
        after = score(keras.models.load_model(args.out / f"run-{n}" / "model.keras"))
        t = result["threshold"]
        forgetting = {name: {"before": result["base_validation_by_group"][name]["called_all"], "after": g["called_all"],
                             "cells": g["cells"]}
                      for name, g in result["validation_by_group"].items() if not g["blast"]}
        curve.append({
            "n": n, "site_blasts": n // 2, "site_normals": n - n // 2, "threshold": t, "threshold_rule": result["threshold_rule"],
            "finetune_seconds": round(seconds, 1), "train_seconds": result["train_seconds"], "replayed": result["site"]["replayed"],
            "blast_sensitivity": {"before": base["blast_sensitivity"], "after": rate(after["blast"], t)},
            "false_blast_rate": {"before": base["false_blast_rate"], "after": rate(after["normal"], t)},
            "shifted_normal_b_cells": {"before": base["shifted_normal_b_cells"], "after": rate(after["hem"], t)},
            "run_validation_normals_called_all": forgetting,
        })
        print(json.dumps(curve[-1]), file=sys.stderr)

    report = {
        "base_run": str(run.folder.resolve()),
        "stands_in_for": {
            "site_normal_cells": f"BCCD white cells cut by the device's segmentation and gate ({len(normal_crops)} cells, "
                                 f"{bccd_scale:.4f} um/px measured on red cells); never trained on",
            "site_blasts": f"C-NMC blasts of the base run's validation patients {blast_patients}, one fixed stain shift "
                           f"(trainer.crosslab.stain_shift, seed {LAB_STAIN_SEED}) for all; fine-tune blasts from patient "
                           f"{tune_patient}, sensitivity measured on the other patient(s)",
            "site_labels": "written as `edge export-reviews` writes reviewed cells (36 um views at 0.125 um/px)",
        },
        "held_out": {"bccd_white_cells": len(normal_rest), "blasts": len(rest_blasts),
                     "blast_patients": sorted({blast_kept[i].patient for i in rest_blasts}),
                     "shifted_normal_b_cells": len(hem_kept)},
        "before": base, "curve": curve, "epochs": args.epochs, "seed": args.seed, "draws_per_n": 1,
        "seconds": round(time.monotonic() - started, 1),
    }
    (args.out / "result.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(curve, base, args.out / "finetune_curve.png")
    largest = args.out / f"run-{biggest}"
    shutil.copy(args.out / "finetune_curve.png", largest / "finetune_curve.png")
    with (largest / "report.md").open("a") as handle:
        handle.write("\n## The curve (benchmarks/bench_finetune.py)\n\nFalse-blast rate and blast sensitivity on the held-out "
                     "cells of the stand-in lab, before and after fine-tuning on N of its cells:\n\n"
                     "![fine-tuning curve](finetune_curve.png)\n")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
