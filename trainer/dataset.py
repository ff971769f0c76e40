"""Labelled cell images from several sources, each at its own physical scale.

Shared by the trainer (fit, evaluate) and the quantizer (calibration, evaluate) so both read
data the same way, and made into model inputs by the device's own segmentation and crop code
(``edge.segmentation``, ``edge.preprocessing``), so training sees exactly what the device sees.

Layouts understood, anywhere under a source folder:

* C-NMC, ours: ``DIR/{all,hem}/*.png``
* the published C-NMC 2019 download: ``C-NMC_Leukemia/training_data/fold_*/{all,hem}/*.bmp``
* its preliminary test set: a folder of ``N.bmp`` with a labels CSV
  (``Patient_ID,new_names,labels``; label 1 = ALL) beside it.
* cell types: ``DIR/<type>/*.jpg`` with types such as ``lymphocyte``, ``monocyte``,
  ``neutrophil``, ... (every one "not a blast") and ``blast`` (an ALL blast), e.g. the PBC data set.
  Images without donor ids are their own group in patient splits.

For C-NMC names the label comes from the folder (or the CSV) and is cross-checked against the
file-name suffix, and the patient id comes from the file name.

Every source has a scale in µm per pixel: given with the folder (``PATH=UM_PER_PX``), written in
a ``leukoscope-scale.json`` inside it, C-NMC's reference (below), or measured on the red cells of
its images (``edge.calibration``); a source whose scale cannot be had is an error.
"""

from __future__ import annotations

import csv
import logging
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from edge.bundle import LABELS  # the class contract: one home, shared with the bundle
from edge.calibration import CNMC_UM_PER_PX, SCALE_FILE, calibrate, check_scale, mixed_sizes, read_scale_file
from edge.errors import DataError
from edge.preprocessing import DEFAULT_CONTRACT, CropContract, crop_cell, read_rgb
from edge.segmentation import SegmentationSettings, find_cells

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff"}
# The published download holds a few copies named like "UID_11_5_4_all (1).bmp".
_NAME = re.compile(r"^UID_(?P<patient>H?\d+)_.*_(?P<label>all|hem)(?: \(\d+\))?$", re.IGNORECASE)
#: Unreadable files tolerated (with a warning naming them) before loading fails.
MAX_UNREADABLE_FRACTION = 0.01
#: Images measured for a source's scale when none is given (per-image spread ~7-13%: 150 images pin
#: the median to ~1%).
CALIBRATION_IMAGES = 150
#: Folder names of the cell-type layout: every kind of normal white cell (label 0) and ALL blasts (1).
NORMAL_TYPES = ("lymphocyte", "monocyte", "ig", "neutrophil", "eosinophil", "basophil", "erythroblast")
BLAST_TYPES = ("blast",)


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # 1 = all, 0 = hem / any other white cell
    patient: str
    source: str = "cnmc"
    cell_type: str = ""  # C-NMC: 'all' / 'hem'; cell-type layout: the folder name
    um_per_px: float = CNMC_UM_PER_PX

    def record(self) -> dict:
        """How a run folder lists it (``from_record`` reads it back)."""
        return {"path": str(self.path.resolve()), "label": self.label, "patient": self.patient, "source": self.source,
                "cell_type": self.cell_type or LABELS[self.label], "um_per_px": self.um_per_px}

    @classmethod
    def from_record(cls, record: dict) -> "Sample":
        return cls(Path(record["path"]), int(record["label"]), str(record["patient"]), str(record["source"]),
                   str(record["cell_type"]), float(record["um_per_px"]))


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
    return Sample(path=path, label=LABELS.index(folder_label), patient=patient, cell_type=folder_label)


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


def scan(root: str | Path, *, require_both: bool = True) -> list[Sample]:
    """Every labelled C-NMC crop under ``root``, sorted; errors for empty or one-class data."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist; pass --data with a folder of {{all,hem}}/ images")
    samples: list[Sample] = []
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.parent.name.lower() in LABELS:
            samples.append(_check(path, path.parent.name.lower(), path.stem))
        elif path.suffix.lower() == ".csv" and "label" in path.name.lower():
            samples.extend(_labelled_csv_samples(path))
    if not samples and not require_both:
        return []
    if not samples:
        raise DataError(
            f"no images found under {root}; expected {root}/all/*.png and {root}/hem/*.png, or the "
            "C-NMC download (C-NMC_Leukemia/training_data/fold_*/{all,hem}/*.bmp)"
        )
    counts = Counter(s.label for s in samples)
    if len(counts) < 2 and require_both:
        only = LABELS[next(iter(counts))]
        raise DataError(f"{root} holds only '{only}' images ({len(samples)}); both all/ and hem/ are needed")
    return samples


def describe(samples: Sequence[Sample]) -> dict:
    """Counts by class, patient, source and cell type, for run records and the report."""
    return {
        "images": len(samples),
        "by_label": {LABELS[k]: v for k, v in sorted(Counter(s.label for s in samples).items())},
        "patients": {
            LABELS[k]: len({s.patient for s in samples if s.label == k}) for k in range(len(LABELS))
        },
        "by_source": {
            source: {"images": sum(1 for s in samples if s.source == source),
                     "um_per_px": next(s.um_per_px for s in samples if s.source == source),
                     "by_type": dict(sorted(Counter(s.cell_type for s in samples if s.source == source).items()))}
            for source in sorted({s.source for s in samples})
        },
    }


def _cell_type_samples(root: Path, name: str) -> list[Sample]:
    samples = []
    for path in sorted(root.rglob("*")):
        kind = path.parent.name.lower()
        if path.suffix.lower() in IMAGE_SUFFIXES and kind in NORMAL_TYPES + BLAST_TYPES and not path.name.startswith("."):
            label = 1 if kind in BLAST_TYPES else 0
            samples.append(Sample(path, label, f"{name}:{path.stem}", name, kind))
    return samples


def _source_scale(root: Path, samples: list[Sample], given: float | None, is_cnmc: bool) -> tuple[float, str]:
    """The source's µm per pixel, and where it came from."""
    if given is not None:
        return check_scale(given, f"scale of {root}"), "given"
    declared = read_scale_file(root)
    if declared is not None:
        return declared, SCALE_FILE
    if is_cnmc:
        return CNMC_UM_PER_PX, "C-NMC reference"
    step = max(1, len(samples) // CALIBRATION_IMAGES)  # spread over the folder: every cell type, every slide
    measured = calibrate([read_rgb(s.path) for s in samples[::step][:CALIBRATION_IMAGES]])
    if measured.um_per_px is None:
        raise DataError(f"source {root} has no scale: its images show too few red cells to measure; give it as "
                        f"{root}=UM_PER_PX or write {SCALE_FILE} in it")
    return check_scale(round(measured.um_per_px, 4), f"scale measured on {root}"), \
        f"red cells ({measured.red_cells_used} in {len(measured.usable)} images, spread {measured.cv or 0:.1%})"


def parse_source(text: str) -> tuple[Path, float | None]:
    """``PATH`` or ``PATH=UM_PER_PX`` from the command line."""
    path, _, value = text.rpartition("=") if "=" in text else (text, "", "")
    if not value:
        return Path(path or text), None
    try:
        return Path(path), float(value)
    except ValueError:
        raise DataError(f"--data {text}: the part after '=' must be the source's µm per pixel, e.g. {path}=0.11") from None


def scan_sources(sources: Sequence[str | Path | tuple[Path, float | None]], *,
                 require_both: bool = True) -> tuple[list[Sample], dict]:
    """Every sample of several sources, each with its scale; and what was found, per source.
    Training needs both classes (``require_both``); measuring, e.g. a false-blast rate, does not."""
    all_samples: list[Sample] = []
    record: dict = {}
    for item in sources:
        root, given = item if isinstance(item, tuple) else parse_source(str(item))
        if not root.is_dir():
            raise DataError(f"data folder {root} does not exist; pass --data with a folder of {{all,hem}}/ images "
                            "or of cell-type folders")
        name = root.resolve().name
        if name in record:
            name = f"{name}-{len(record)}"
        typed = _cell_type_samples(root, name)
        cnmc = [] if typed else scan(root, require_both=False)
        samples = typed or cnmc
        if not samples:
            raise DataError(f"no images found under {root}; expected {{all,hem}}/ or cell-type folders "
                            f"({', '.join(NORMAL_TYPES + BLAST_TYPES)})")
        scale, origin = _source_scale(root, samples, given, is_cnmc=bool(cnmc))
        samples = [Sample(s.path, s.label, s.patient, name, s.cell_type, scale) for s in samples]
        record[name] = {"path": str(root.resolve()), "um_per_px": scale, "scale_from": origin,
                        "layout": "cell types" if typed else "C-NMC"}
        all_samples.extend(samples)
    counts = Counter(s.label for s in all_samples)
    if len(counts) < 2 and require_both:
        raise DataError(f"the data holds only '{LABELS[next(iter(counts))]}' images; training needs ALL blasts and normal cells")
    return all_samples, record


def cell_input(image: np.ndarray, um_per_px: float, contract: CropContract) -> np.ndarray | None:
    """The model input for the one cell of a single-cell image, made as the device makes it: the
    device's segmentation finds the cells, the one nearest the centre is cropped by the contract."""
    cells = find_cells(image, SegmentationSettings(um_per_px=um_per_px))
    if not cells:
        return None
    height, width = image.shape[:2]
    cell = min(cells, key=lambda c: (c.bbox[0] + c.bbox[2] / 2 - width / 2) ** 2 + (c.bbox[1] + c.bbox[3] / 2 - height / 2) ** 2)
    return crop_cell(image, cell.mask, cell.bbox, um_per_px, contract)


def load_arrays(
    samples: Sequence[Sample], contract: CropContract = DEFAULT_CONTRACT, *, workers: int = 4, progress: bool = True,
    transform: Callable[[np.ndarray, Sample], tuple[np.ndarray, float]] | None = None,
) -> tuple[np.ndarray, list[Sample]]:
    """Decode, segment and crop in parallel; returns (N x size x size x 3 uint8, kept samples).

    ``transform(image, sample) -> (image, um_per_px)`` alters each decoded image first (training
    augmentation, robustness checks). A few unreadable files are reported by name and left out; more
    than ``MAX_UNREADABLE_FRACTION`` unreadable is an error. Images where the device's segmentation
    finds no cell are left out and counted per source in the log: the device would not classify them.
    """

    sides: dict[str, dict[int, str]] = {}

    def load(sample: Sample) -> np.ndarray | DataError | None:
        try:
            image, scale = read_rgb(sample.path), sample.um_per_px
            sides.setdefault(sample.source, {}).setdefault(max(image.shape[:2]), sample.path.name)
            if transform is not None:
                image, scale = transform(image, sample)
            return cell_input(image, scale, contract)
        except DataError as error:
            return error

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results: Iterable = pool.map(load, samples)
        if progress:
            from edge.console import progress as progress_bar

            results = progress_bar(results, total=len(samples), desc=f"crop {contract.size}px", unit="img")
        loaded = list(results)
    for source, seen in sides.items():
        mixed = mixed_sizes(seen)
        if mixed:
            raise DataError(f"source {source} mixes image sizes ({mixed}); "
                            "one source has one scale, so put images of another magnification in a folder of their own")
    bad = [s for s, r in zip(samples, loaded) if isinstance(r, DataError)]
    if bad:
        names = ", ".join(s.path.name for s in bad[:10]) + (" ..." if len(bad) > 10 else "")
        if len(bad) > max(1, MAX_UNREADABLE_FRACTION * len(samples)):
            raise DataError(f"{len(bad)} of {len(samples)} images are unreadable ({names}); fix or remove them")
        log.warning("skipping %d unreadable image(s): %s", len(bad), names)
    empty = Counter(s.source for s, r in zip(samples, loaded) if r is None)
    for source, count in sorted(empty.items()):
        log.info("%s: no cell found in %d image(s); left out, as the device would skip them", source, count)
    kept = [s for s, r in zip(samples, loaded) if isinstance(r, np.ndarray)]
    if not kept:
        raise DataError("no readable images with a cell left")
    return np.stack([r for r in loaded if isinstance(r, np.ndarray)]), kept
