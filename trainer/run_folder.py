"""The run folder ``trainer fit`` writes and ``quantize export`` / ``trainer evaluate`` read: one
definition of its documents, so writer and readers cannot drift apart.

* ``model.json`` (:class:`RunModel`): what a reader needs to use ``model.keras``: its kind, input size,
  decision threshold, class labels and the crop contract it was trained with.
* ``split.json`` (:class:`SplitRecord`): the patients and samples of each side, so that nothing is ever
  scored as "new patients" that the model trained on.
* ``config.json`` and ``metrics.json`` stay open dictionaries: a person reads them, code only
  quotes them (the model card, the report).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.errors import BundleError, UserError
from edge.preprocessing import COLOR_ORDER, CropContract
from edge.bundle import LABELS, POSITIVE_LABEL
from trainer.dataset import Sample

MODEL_FILE = "model.keras"
SIDES = ("train", "validation", "test")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except OSError as error:
        raise UserError(f"{path} cannot be read ({error.strerror}); is this a folder written by `trainer fit`?") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not valid JSON (line {error.lineno}); restore it or retrain the run") from None


@dataclass(frozen=True)
class RunModel:
    """``model.json``."""

    kind: str
    input_size: int
    threshold: float
    contract: CropContract
    labels: tuple[str, ...] = LABELS
    positive_label: str = POSITIVE_LABEL
    color_order: str = COLOR_ORDER
    model_file: str = MODEL_FILE

    def write(self, folder: Path) -> None:
        (folder / "model.json").write_text(json.dumps({
            "model_file": self.model_file, "kind": self.kind, "input_size": self.input_size,
            "threshold": self.threshold, "labels": list(self.labels), "positive_label": self.positive_label,
            "color_order": self.color_order, "preprocessing": self.contract.to_manifest(),
        }, indent=2) + "\n")

    @classmethod
    def read(cls, folder: Path) -> "RunModel":
        path = folder / "model.json"
        record = _read_json(path)
        try:
            contract = CropContract.from_manifest(record.get("preprocessing", {}), str(path))
        except BundleError as error:
            raise UserError(str(error)) from None
        try:
            return cls(kind=str(record["kind"]), input_size=int(record["input_size"]), threshold=float(record["threshold"]),
                       contract=contract, labels=tuple(record.get("labels", LABELS)),
                       positive_label=str(record.get("positive_label", POSITIVE_LABEL)),
                       color_order=str(record.get("color_order", COLOR_ORDER)),
                       model_file=str(record.get("model_file", MODEL_FILE)))
        except (KeyError, TypeError, ValueError) as error:
            raise UserError(f"{path}: missing or malformed {error}; restore it or retrain the run") from None


@dataclass(frozen=True)
class SplitRecord:
    """``split.json``: per side, its patients and every sample with its source and scale
    (``trainer.split.Split.as_record``)."""

    sides: dict[str, dict[str, Any]]

    def write(self, folder: Path) -> None:
        (folder / "split.json").write_text(json.dumps(self.sides, indent=1) + "\n")

    @classmethod
    def read(cls, folder: Path) -> "SplitRecord":
        return cls(_read_json(folder / "split.json"))

    def patients(self, side: str) -> set[str]:
        return set(self.sides.get(side, {}).get("patients", []))

    def samples(self, side: str, run: Path) -> list[Sample]:
        """The side's samples, each still on disk; one line naming what to pass when they are not."""
        if side in self.sides and "samples" not in self.sides[side]:
            raise UserError(f"{run / 'split.json'} was written by an older trainer (no per-sample scale); retrain the run")
        samples = [Sample.from_record(r) for r in self.sides.get(side, {}).get("samples", [])]
        absent = [s.path for s in samples if not s.path.is_file()]
        if absent:
            flag = "--calibration DIR" if side == "train" else "--data DIR"
            raise UserError(f"{len(absent)} of the run's {side} images are not here (e.g. {absent[0]}); pass {flag}")
        return samples

    def paths(self, side: str) -> set[str]:
        return {record["path"] for record in self.sides.get(side, {}).get("samples", [])}


@dataclass(frozen=True)
class Run:
    """A complete run folder, read once."""

    folder: Path
    model: RunModel
    split: SplitRecord
    config: dict[str, Any]
    metrics: dict[str, Any]

    @classmethod
    def read(cls, folder: Path) -> "Run":
        needed = (MODEL_FILE, "model.json", "split.json", "config.json")
        missing = [name for name in needed if not (folder / name).is_file()]
        if missing:
            raise UserError(f"{folder} is not a complete training run (missing {', '.join(missing)}); run `trainer fit` first")
        metrics = _read_json(folder / "metrics.json") if (folder / "metrics.json").is_file() else {}
        return cls(folder, RunModel.read(folder), SplitRecord.read(folder), _read_json(folder / "config.json"), metrics)

    @property
    def threshold_rule(self) -> str:
        return str(self.metrics.get("threshold_rule", "chosen on validation"))
