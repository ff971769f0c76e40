"""Blasts on a smear under everything another microscope changes: does the device still call them ALL?

    python benchmarks/bench_blast_shifts.py [--step 10] [--noise-sweep]

``bench_robustness.py`` changes BCCD frames (healthy blood) as another lab's microscope would show them: a camera's
white balance, a lamp, exposure, stain strength and hue, magnification, sensor noise, JPEG, focus, a camera's
picture settings, uneven light (``PERTURBATIONS``), and ``bench_crosslab.py --shifts`` counts the healthy cells
called ALL. This is the other side: real C-NMC blasts and normal B-cells placed four to a real BCCD field
(``bench_defocus.frames``), each frame changed the same ways and run through the device's own pipeline with the
shipped int8 bundle. Per change and class: cells classified, the share called ALL, and the share of decisions
that are those of the frames as composed. The C-NMC cells include patients the model trained on, so the share
called ALL as composed is optimistic; what this measures is how far each change moves it. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge.classifier import Classifier  # noqa: E402
from edge.pipeline import Pipeline  # noqa: E402
from edge.segmentation import SegmentationSettings  # noqa: E402
from benchmarks.bench_defocus import compared, frames, measure  # noqa: E402
from benchmarks.bench_robustness import NOISE_SWEEP, PERTURBATIONS  # noqa: E402
from tests.composing import BCCD_UM_PER_PX  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=ROOT / "models" / "default")
    parser.add_argument("--step", type=int, default=10, help="every N-th C-NMC image of each class")
    parser.add_argument("--noise-sweep", action="store_true", help="camera noise of every strength and grain instead "
                        "(bench_robustness.NOISE_SWEEP), compared with the frames as composed")
    args = parser.parse_args()
    changes = {"as recorded": PERTURBATIONS["as recorded"], **NOISE_SWEEP} if args.noise_sweep else PERTURBATIONS
    started = time.perf_counter()
    classifier = Classifier(args.bundle)
    positive = classifier.bundle.positive_label
    composed = frames(args.step)
    runs = {name: measure(Pipeline(classifier, SegmentationSettings(um_per_px=BCCD_UM_PER_PX / zoom)), composed, change,
                          positive, zoom)
            for name, (change, zoom) in changes.items()}
    report = {"bundle": str(args.bundle), "um_per_px": BCCD_UM_PER_PX, "frames": len(composed),
              "changes": compared(runs, "as recorded", "same_decision_as_composed"),
              "seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
