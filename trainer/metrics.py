"""Metrics the C-NMC challenge and a hematology lab ask for, from scores and labels.

Weighted F1 is the C-NMC 2019 challenge metric; sensitivity and specificity are for ALL,
the positive class. No TensorFlow here: the quantizer scores int8 models with the same code.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, roc_auc_score, roc_curve


class CollapsedModel(Exception):
    """The model gives (nearly) one answer for everything: a report would look fine and mean nothing."""


#: Fewest validation cells of each class for choosing the threshold from data.
MIN_CELLS_FOR_THRESHOLD = 50


def choose_threshold(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None) -> tuple[float, str]:
    """(threshold, rule): Youden's J (sensitivity + specificity - 1) on validation, or 0.5.

    Balanced on purpose: the classes are imbalanced per patient and per lab, and a screening
    aid should not buy accuracy by calling everything ALL. With fewer than
    ``MIN_CELLS_FOR_THRESHOLD`` validation cells in a class, a threshold fitted to them is noise
    (seen: 0.09 from 17 normal cells); training uses balanced class weights, so 0.5 is then the
    balanced choice. ``weights`` (the training balance of sources and cell types) make every
    source's normal cells count alike, so thousands of easy normals from one lab do not set it.
    """
    counts = np.bincount(np.asarray(labels, dtype=int), minlength=2)
    if counts.min() < MIN_CELLS_FOR_THRESHOLD:
        return 0.5, f"the default for class-balanced training: validation holds only {counts.min()} cells of one class"
    fpr, tpr, thresholds = roc_curve(labels, scores, sample_weight=weights)
    best = int(np.argmax(tpr - fpr))
    rule = "max Youden J on validation patients" + (", sources and cell types balanced" if weights is not None else "")
    return float(np.clip(thresholds[best], 1e-6, 1 - 1e-6)), rule


#: Fewest validation cells of one normal cell type for its false-blast rate to cap the threshold.
MIN_CELLS_FOR_TYPE_CAP = 20


def cap_per_type(threshold: float, rule: str, normal_scores_by_type: dict[str, np.ndarray],
                 cap: float | None) -> tuple[float, str]:
    """(threshold, rule) raised until no normal cell type is called ALL on more than ``cap`` of its
    validation cells. Why: Youden balances the classes as a whole, and a model that calls 18% of
    another lab's normal lymphocytes blasts can still maximise it; such folds called 20-23% of BCCD's
    healthy white cells ALL (``benchmarks/bench_decision.py``). A type with fewer than
    ``MIN_CELLS_FOR_TYPE_CAP`` cells is too few to set it. ``cap`` None: unchanged."""
    if cap is None:
        return threshold, rule
    limits = {name: float(np.quantile(scores, 1 - cap)) for name, scores in normal_scores_by_type.items()
              if len(scores) >= MIN_CELLS_FOR_TYPE_CAP}
    binding = max(limits, key=limits.get, default=None)
    if binding is None or limits[binding] <= threshold:
        return threshold, f"{rule}; no normal cell type above {cap:.0%} called ALL at it"
    raised = float(np.nextafter(np.float32(limits[binding]), np.float32(1)))  # scores at the quantile stay normal
    return min(raised, 1 - 1e-6), f"{rule}, raised until no normal cell type is called ALL above {cap:.0%} ({binding} set it)"


def check_not_collapsed(scores: np.ndarray, threshold: float) -> None:
    """Raise ``CollapsedModel`` when predictions carry no information."""
    spread = float(np.percentile(scores, 95) - np.percentile(scores, 5))
    positive = float(np.mean(scores >= threshold))
    if spread < 0.02 or positive in (0.0, 1.0):
        raise CollapsedModel(
            f"model collapsed on validation: 90% of scores lie within {spread:.4f} and "
            f"{positive:.0%} are called ALL; train longer, lower the learning rate or check the data "
            "(--allow-collapse writes the run anyway)"
        )


def compute(labels: Sequence[int], scores: Sequence[float], threshold: float, patients: Sequence[str] | None = None) -> dict:
    labels = np.asarray(labels, dtype=int)
    scores = np.asarray(scores, dtype=float)
    predicted = (scores >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(labels, predicted, labels=[0, 1]).ravel()
    result = {
        "images": int(len(labels)),
        "threshold": float(threshold),
        "accuracy": float(accuracy_score(labels, predicted)),
        "weighted_f1": float(f1_score(labels, predicted, average="weighted", zero_division=0)),
        "sensitivity_all": float(tp / (tp + fn)) if tp + fn else None,
        "specificity_all": float(tn / (tn + fp)) if tn + fp else None,
        "roc_auc": float(roc_auc_score(labels, scores)) if len(np.unique(labels)) == 2 else None,
        "confusion": {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)},
    }
    if patients is not None:
        hits: dict[str, list[int]] = defaultdict(list)
        for patient, truth, guess in zip(patients, labels, predicted):
            hits[patient].append(int(truth == guess))
        result["per_patient_accuracy"] = {p: round(float(np.mean(h)), 4) for p, h in sorted(hits.items())}
    return result


def fmt(value: float | None, digits: int = 3) -> str:
    """A metric for people: 'n/a' where it is undefined (one class only), never a misleading 0."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def summary_line(m: dict) -> str:
    return (f"weighted F1 {fmt(m['weighted_f1'])}  accuracy {fmt(m['accuracy'])}  sensitivity {fmt(m['sensitivity_all'])}  "
            f"specificity {fmt(m['specificity_all'])}  AUC {fmt(m['roc_auc'])}")


def table_cells(m: dict) -> str:
    """The Markdown cells used by report.md and MODEL_CARD.md: F1, accuracy, sensitivity, specificity, AUC."""
    return " | ".join(fmt(m[k]) for k in ("weighted_f1", "accuracy", "sensitivity_all", "specificity_all", "roc_auc"))


def summarize_folds(fold_metrics: list[dict]) -> dict:
    """Mean, standard deviation, min and max across folds of each scalar metric."""
    summary = {}
    for key in ("accuracy", "weighted_f1", "sensitivity_all", "specificity_all", "roc_auc"):
        values = [m[key] for m in fold_metrics if m.get(key) is not None]
        if values:
            summary[key] = {
                "mean": float(np.mean(values)),
                "std": float(np.std(values)),
                "min": float(np.min(values)),
                "max": float(np.max(values)),
            }
    return summary
