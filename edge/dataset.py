"""Labelled cell-crop folders, in the layouts users have.

Shared by the trainer (fit, evaluate) and the quantizer (calibration, evaluate) so both
read data the same way. Three layouts are understood, anywhere under the given folder:

* ours: ``DIR/{all,hem}/*.png``
* the published C-NMC 2019 download: ``C-NMC_Leukemia/training_data/fold_*/{all,hem}/*.bmp``
* its preliminary test set: a folder of ``N.bmp`` with a labels CSV
  (``Patient_ID,new_names,labels``; label 1 = ALL) beside it.

The label comes from the folder (or the CSV) and is cross-checked against the original
file-name suffix; the patient id comes from the original file name.
"""

from __future__ import annotations

import csv
import logging
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from edge.errors import DataError
from edge.preprocessing import load_crop

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff"}
LABELS = ("hem", "all")  # index = class id; 1 = ALL (leukemic blast), the positive class
POSITIVE_LABEL = "all"
# The published download holds a few copies named like "UID_11_5_4_all (1).bmp".
_NAME = re.compile(r"^UID_(?P<patient>H?\d+)_.*_(?P<label>all|hem)(?: \(\d+\))?$", re.IGNORECASE)
#: Unreadable files tolerated (with a warning naming them) before loading fails.
MAX_UNREADABLE_FRACTION = 0.01


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # 1 = all, 0 = hem
    patient: str


def parse_name(stem: str) -> tuple[str, str]:
    """(patient id, label) from a C-NMC file stem such as ``UID_H10_100_1_hem``."""
    match = _NAME.match(stem)
    if not match:
        raise DataError(
            f"{stem}: file name does not follow the C-NMC pattern UID_<patient>_..._<all|hem>; "
            "rename it or move it out of the data folder"
        )
    return match["patient"].upper(), match["label"].lower()


def _check(path: Path, folder_label: str, stem: str) -> Sample:
    patient, name_label = parse_name(stem)
    if name_label != folder_label:
        raise DataError(
            f"{path}: label conflict, the file name says '{name_label}' but it is filed as "
            f"'{folder_label}'; move the file to the right folder"
        )
    if (name_label == "hem") != patient.startswith("H"):
        raise DataError(
            f"{path}: patient id '{patient}' does not fit label '{name_label}' "
            "(healthy donors are H<n>, patients are <n>); check the file"
        )
    return Sample(path=path, label=LABELS.index(folder_label), patient=patient)


def sample_for(path: str | Path) -> Sample:
    """The sample a recorded file path stands for (a run's split lists files by path)."""
    path = Path(path)
    folder = path.parent.name.lower()
    return _check(path, folder if folder in LABELS else parse_name(path.stem)[1], path.stem)


def _labelled_csv_samples(csv_path: Path) -> list[Sample]:
    samples = []
    with csv_path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        needed = {"Patient_ID", "new_names", "labels"}
        if not needed <= set(reader.fieldnames or ()):
            return []
        for row in reader:
            path = csv_path.parent / "C-NMC_test_prelim_phase_data" / row["new_names"]
            if not path.exists():
                path = csv_path.parent / row["new_names"]
            folder_label = LABELS[int(row["labels"])]
            samples.append(_check(path, folder_label, Path(row["Patient_ID"]).stem))
    return samples


def scan(root: str | Path) -> list[Sample]:
    """Every labelled crop under ``root``, sorted; errors for empty or one-class data."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist; pass --data with a folder of {{all,hem}}/ images")
    samples: list[Sample] = []
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.parent.name.lower() in LABELS:
            samples.append(_check(path, path.parent.name.lower(), path.stem))
        elif path.suffix.lower() == ".csv" and "label" in path.name.lower():
            samples.extend(_labelled_csv_samples(path))
    if not samples:
        raise DataError(
            f"no images found under {root}; expected {root}/all/*.png and {root}/hem/*.png, or the "
            "C-NMC download (C-NMC_Leukemia/training_data/fold_*/{all,hem}/*.bmp)"
        )
    counts = Counter(s.label for s in samples)
    if len(counts) < 2:
        only = LABELS[next(iter(counts))]
        raise DataError(f"{root} holds only '{only}' images ({len(samples)}); both all/ and hem/ are needed")
    return samples


def describe(samples: Sequence[Sample]) -> dict:
    """Counts by class and patient, for run records and the report."""
    return {
        "images": len(samples),
        "by_label": {LABELS[k]: v for k, v in sorted(Counter(s.label for s in samples).items())},
        "patients": {
            LABELS[k]: len({s.patient for s in samples if s.label == k}) for k in range(len(LABELS))
        },
    }


def load_arrays(
    samples: Sequence[Sample], size: int, *, workers: int = 4, progress: bool = True
) -> tuple[np.ndarray, list[Sample]]:
    """Decode and preprocess crops in parallel; returns (N x size x size x 3 uint8, kept samples).

    A few unreadable files are reported by name and left out; more than
    ``MAX_UNREADABLE_FRACTION`` of the data unreadable is an error.
    """

    def load(sample: Sample) -> np.ndarray | DataError:
        try:
            return load_crop(sample.path, size)
        except DataError as error:
            return error

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results: Iterable = pool.map(load, samples)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(samples), desc=f"decode {size}px", unit="img")
        loaded = list(results)
    bad = [s for s, r in zip(samples, loaded) if isinstance(r, DataError)]
    if bad:
        names = ", ".join(s.path.name for s in bad[:10]) + (" ..." if len(bad) > 10 else "")
        if len(bad) > max(1, MAX_UNREADABLE_FRACTION * len(samples)):
            raise DataError(f"{len(bad)} of {len(samples)} images are unreadable ({names}); fix or remove them")
        log.warning("skipping %d unreadable image(s): %s", len(bad), names)
    kept = [s for s, r in zip(samples, loaded) if not isinstance(r, DataError)]
    if not kept:
        raise DataError("no readable images left")
    return np.stack([r for r in loaded if not isinstance(r, DataError)]), kept
