"""Where the shipped int8 bundle holds, measured through the device's own pipeline.

    python benchmarks/bench_crosslab.py [--bundle models/default] [--data ../shared/data] [--run runs/v2b] [--shifts]
        [--blue-threshold 35]

* BCCD (healthy blood, a lab never trained on): every BCCD frame through ``edge.pipeline`` exactly as
  the device runs it (segmentation, quality gate, µm crop, int8 LiteRT) at the frames' scale measured on
  their red cells; classified cells that match an annotated white cell are normal, so the share called
  ALL is the false-blast rate.
* With ``--shifts``: the same, with every frame's channels scaled as another camera's white balance, another
  lamp or a darker exposure would, or its colours turned as a redder stain shows them, or blurred as a focus
  a little off shows them (``SHIFTS``), the scale measured again on the changed frames: another lab's colours
  and a careless focus on the same cells.
* With ``--run`` (the run the bundle was exported from): its validation cells (patients and images never
  trained on) per source and cell type with the int8 model, and the float-vs-int8 decision agreement on them.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from edge.calibration import calibrate  # noqa: E402
from edge.classifier import Classifier  # noqa: E402
from edge.pipeline import Pipeline  # noqa: E402
from edge.preprocessing import read_rgb  # noqa: E402
from edge.segmentation import SegmentationSettings  # noqa: E402
from edge.sources import Frame  # noqa: E402
from trainer.crosslab import iou, wbc_boxes  # noqa: E402
from benchmarks.bench_robustness import COLOUR_SHIFTS, camera_tone, cast, defocus, hue, uneven  # noqa: E402


#: ``--shifts``' report keys -> the changes ``bench_robustness.py`` measures segmentation under:
#: another camera's or lamp's channel gains, a redder or bluer stain (every colour turned +-20 degrees), a lamp
#: off-centre (the light falling to 60% across the frame), a lamp turned down to 45%, the camera's own picture
#: settings (saturation, contrast, gamma), and a focus a little off (a Gaussian blur of 0.25 and 0.5 µm).
SHIFTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    **dict(zip(("blue_cast", "magenta_cast", "yellow_lamp", "underexposed"), map(cast, COLOUR_SHIFTS.values()))),
    "hue_plus_20": hue(20),
    "hue_minus_20": hue(-20),
    "lamp_off_centre": uneven(0.6, (0.3, 0.2)),
    "dim_lamp": cast((0.45, 0.45, 0.45)),
    "camera_saturation_x0.6": camera_tone(saturation=0.6),
    "camera_saturation_x1.5": camera_tone(saturation=1.5),
    "camera_contrast_x1.3": camera_tone(contrast=1.3),
    "camera_gamma_0.7": camera_tone(gamma=0.7),
    "camera_gamma_1.4": camera_tone(gamma=1.4),
    "defocus_0.25um": defocus(0.25),
    "defocus_0.5um": defocus(0.5),
}


def bccd(classifier: Classifier, root: Path, change: Callable[[np.ndarray], np.ndarray] | None = None,
         blue_threshold: int = SegmentationSettings.blue_threshold) -> dict:
    """The false-blast rate on BCCD's frames, each changed by ``change`` (None: as recorded), with the
    nucleus rule at ``blue_threshold`` (``segmentation.blue_threshold``)."""
    def read(path: Path) -> np.ndarray:
        return read_rgb(path) if change is None else change(read_rgb(path))

    frames = sorted((root / "JPEGImages").glob("*.jpg"))
    scale = calibrate([read(p) for p in frames[::max(1, len(frames) // 60)]]).um_per_px
    pipeline = Pipeline(classifier, SegmentationSettings(um_per_px=scale, blue_threshold=blue_threshold))
    annotated = classified = called = unclassified = elsewhere = elsewhere_all = 0
    for path in frames:
        truth = wbc_boxes(root / "Annotations" / f"{path.stem}.xml")
        annotated += len(truth)
        result, _, _ = pipeline.process(Frame(image=read(path), name=path.name))
        annotated_cell = lambda box: any(iou((box[0], box[1], box[0] + box[2], box[1] + box[3]), b) > 0.3  # noqa: E731
                                         for b in truth)
        for cell in result["cells"]:
            if annotated_cell(cell["bbox"]):
                classified += 1
                called += cell["label"] == classifier.bundle.positive_label
            else:  # counted by the device, but no white cell is there (or one BCCD left unannotated)
                elsewhere += 1
                elsewhere_all += cell["label"] == classifier.bundle.positive_label
        unclassified += sum(1 for c in result["unclassified"] if annotated_cell(c["bbox"]))
    return {"frames": len(frames), "um_per_px": round(float(scale), 4), "annotated_white_cells": annotated,
            "classified": classified, "unclassified_by_gate": unclassified, "called_all": called,
            "classified_on_no_annotated_white_cell": elsewhere, "of_them_called_all": elsewhere_all,
            "false_blast_rate": round(called / classified, 4) if classified else None}


def validation(classifier: Classifier, run: Path) -> dict:
    import keras

    from trainer.dataset import Sample, load_arrays
    from trainer import pipeline
    from trainer.fit import by_group

    split = json.loads((run / "split.json").read_text())
    samples = [Sample.from_record(r) for r in split["validation"]["samples"]]
    images, samples = load_arrays(samples, classifier.contract, progress=False)
    int8 = classifier.scores(images)
    floats = pipeline.predict(keras.models.load_model(run / "model.keras"), images)
    threshold = classifier.threshold
    return {"cells": len(samples), "by_group_int8": by_group(samples, int8, threshold),
            "float_vs_int8_decision_agreement": round(float(np.mean((floats >= threshold) == (int8 >= threshold))), 4),
            "max_abs_score_difference": round(float(np.max(np.abs(floats - int8))), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=ROOT / "models" / "default")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--run", type=Path, default=None, help="the training run the bundle came from")
    parser.add_argument("--shifts", action="store_true", help="BCCD again under each change in SHIFTS (colour, light, focus)")
    parser.add_argument("--blue-threshold", type=int, default=SegmentationSettings.blue_threshold,
                        help="segmentation.blue_threshold to measure (default: the device's, %(default)s; 30 is the "
                             "README's setting for a redder stain)")
    args = parser.parse_args()
    started = time.perf_counter()
    classifier = Classifier(args.bundle)
    report: dict = {"bundle": str(args.bundle), "threshold": classifier.threshold, "blue_threshold": args.blue_threshold,
                    "bccd": bccd(classifier, args.data / "bccd", blue_threshold=args.blue_threshold)}
    if args.shifts:
        report["bccd_shifted"] = {name: bccd(classifier, args.data / "bccd", change, args.blue_threshold)
                                  for name, change in SHIFTS.items()}
    if args.run:
        report["validation"] = validation(classifier, args.run)
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
