"""PNG plots people look at instead of reading numbers: curves, confusion matrix, ROC."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402


def training_curves(history: dict[str, list[float]], path: Path) -> None:
    metrics = [k for k in ("loss", "auc", "accuracy", "source_loss") if k in history]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    for axis, name in zip(axes[0], metrics):
        epochs = np.arange(1, len(history[name]) + 1)
        axis.plot(epochs, history[name], label="train")
        if f"val_{name}" in history:
            axis.plot(epochs, history[f"val_{name}"], label="validation (other patients)")
        axis.set_xlabel("epoch")
        axis.set_title(name)
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def confusion(metrics: dict, path: Path, title: str) -> None:
    c = metrics["confusion"]
    matrix = np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]])
    fig, axis = plt.subplots(figsize=(4.5, 4))
    axis.imshow(matrix, cmap="Blues")
    for (row, col), value in np.ndenumerate(matrix):
        axis.text(col, row, str(value), ha="center", va="center",
                  color="white" if value > matrix.max() / 2 else "black", fontsize=14)
    axis.set_xticks([0, 1], ["hem (normal)", "all (blast)"])
    axis.set_yticks([0, 1], ["hem (normal)", "all (blast)"])
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(f"{title}\nthreshold {metrics['threshold']:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> None:
    """One ROC line per named (labels, scores) pair."""
    fig, axis = plt.subplots(figsize=(4.5, 4.5))
    for name, (labels, scores) in curves.items():
        if len(np.unique(labels)) < 2:
            continue
        fpr, tpr, _ = roc_curve(labels, scores)
        axis.plot(fpr, tpr, label=name)
    axis.plot([0, 1], [0, 1], "k--", alpha=0.4)
    axis.set_xlabel("1 - specificity")
    axis.set_ylabel("sensitivity (ALL)")
    axis.set_title("ROC")
    axis.legend(loc="lower right")
    axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def score_histograms(groups: dict[str, np.ndarray], threshold: float, path: Path) -> None:
    """P(ALL) per source and cell type on one axis each: where every kind of cell falls against the
    threshold, including labs never trained on."""
    groups = {name: np.asarray(scores) for name, scores in groups.items() if len(scores)}
    fig, axes = plt.subplots(len(groups), 1, figsize=(7, 1.1 * len(groups) + 0.8), sharex=True, squeeze=False)
    bins = np.linspace(0, 1, 41)
    for axis, (name, scores) in zip(axes[:, 0], groups.items()):
        axis.hist(scores, bins=bins, color="tab:red" if name.endswith(("/all", "/blast")) else "tab:blue", alpha=0.8)
        axis.axvline(threshold, color="k", linestyle="--", linewidth=1)
        axis.set_ylabel(f"{name}\n(n={len(scores)})", rotation=0, ha="right", va="center", fontsize=8)
        axis.set_yticks([])
    axes[-1, 0].set_xlabel("P(ALL)  (dashed: decision threshold)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def crop_grid(crops: np.ndarray, captions: list[str], path: Path, title: str, columns: int = 8) -> None:
    """Model inputs as the model saw them, captioned: e.g. the most confident false blasts."""
    count = max(1, len(crops))
    rows = int(np.ceil(count / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(1.5 * columns, 1.7 * rows + 0.4), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, crop, caption in zip(axes.flat, crops, captions):
        axis.imshow(crop)
        axis.set_title(caption, fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
