"""Training runs: one model on a patient split (``fit``) or one per grouped fold (``cross_validate``).

A run folder holds everything needed to trust, reproduce and export the model:
``model.keras``, ``model.json`` (input size, preprocessing, decision threshold),
``config.json``, ``split.json``, ``history.csv``, ``metrics.json``, the plots and ``report.md``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from edge import DISCLAIMER, __version__
from edge.dataset import LABELS, POSITIVE_LABEL, Sample, describe, load_arrays, scan
from edge.errors import UserError
from edge.preprocessing import COLOR_ORDER, PREPROCESSING_NAME
from trainer import metrics as M
from trainer import plots
from trainer.split import Split, grouped_folds, patient_split

log = logging.getLogger(__name__)


@dataclass
class FitConfig:
    model: str = "edge"
    epochs: int = 40
    image_size: int | None = None  # None: the model's default (edge 128, seed 256)
    batch_size: int = 32
    seed: int = 0
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    patience: int = 10
    steps_per_epoch: int | None = None  # None: one pass over the training images
    time_budget_min: float | None = None  # stop after the epoch that crosses this many minutes
    allow_collapse: bool = False

    def resolved_size(self) -> int:
        return self.image_size or (256 if self.model == "seed" else 128)


def fingerprint(samples: Sequence[Sample]) -> str:
    """A cheap identity of the training data: file names, labels and sizes."""
    digest = hashlib.sha256()
    for sample in sorted(samples, key=lambda s: s.path.name):
        digest.update(f"{sample.path.name}:{sample.label}:{sample.path.stat().st_size}\n".encode())
    return digest.hexdigest()


def _versions() -> dict:
    import keras
    import sklearn
    import tensorflow as tf

    return {"leukoscope": __version__, "tensorflow": tf.__version__, "keras": keras.__version__,
            "scikit-learn": sklearn.__version__, "numpy": np.__version__, "python": platform.python_version()}


def _strategy():
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        log.info("training on %d GPUs with MirroredStrategy", len(gpus))
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def _class_weights(labels: np.ndarray) -> dict[int, float]:
    counts = np.bincount(labels, minlength=2)
    return {c: float(len(labels) / (2 * counts[c])) for c in range(2) if counts[c]}


def _time_budget_callback():
    import keras

    class TimeBudget(keras.callbacks.Callback):
        """Stop after the epoch that uses up the budget: compare models at equal training time."""

        def __init__(self, seconds: float) -> None:
            super().__init__()
            self.seconds = seconds
            self.started = time.monotonic()

        def on_epoch_end(self, epoch, logs=None):
            if time.monotonic() - self.started > self.seconds:
                log.info("time budget of %.0f s used after epoch %d; stopping", self.seconds, epoch + 1)
                self.model.stop_training = True

    return TimeBudget


def train_on_split(images: np.ndarray, samples: Sequence[Sample], split: Split, out: Path, config: FitConfig,
                   data_dir: Path) -> dict:
    """Train, select the threshold, measure, plot and report; returns metrics.json's content."""
    import keras

    from trainer import pipeline
    from trainer.models import build

    TimeBudget = _time_budget_callback()
    out.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(config.seed)
    labels = np.array([s.label for s in samples])
    patients = [s.patient for s in samples]
    size = config.resolved_size()
    train, val, test = (np.array(getattr(split, n), dtype=int) for n in ("train", "validation", "test"))

    (out / "split.json").write_text(json.dumps(split.as_record(samples), indent=1) + "\n")
    steps = config.steps_per_epoch or math.ceil(len(train) / config.batch_size)
    with _strategy().scope():
        model, optimizer = build(config.model, size)
        model.compile(optimizer=optimizer, loss="binary_crossentropy",
                      metrics=[keras.metrics.AUC(name="auc"), keras.metrics.BinaryAccuracy(name="accuracy")])
    best_path = out / "best.keras"
    callbacks = [
        keras.callbacks.ModelCheckpoint(best_path, monitor="val_auc", mode="max", save_best_only=True),
        keras.callbacks.EarlyStopping(monitor="val_auc", mode="max", patience=config.patience, restore_best_weights=True),
        keras.callbacks.ReduceLROnPlateau(monitor="val_auc", mode="max", factor=0.5, patience=max(2, config.patience // 3)),
        keras.callbacks.CSVLogger(out / "history.csv"),
    ]
    if config.time_budget_min:
        callbacks.append(TimeBudget(config.time_budget_min * 60))
    started = time.monotonic()
    history = model.fit(
        pipeline.dataset(images[train], labels[train], batch_size=config.batch_size, training=True, seed=config.seed),
        validation_data=pipeline.dataset(images[val], labels[val], batch_size=64, training=False, seed=config.seed),
        epochs=config.epochs, steps_per_epoch=steps, class_weight=_class_weights(labels[train]),
        callbacks=callbacks, verbose="auto",
    )
    train_seconds = time.monotonic() - started
    model.save(out / "model.keras")
    best_path.unlink(missing_ok=True)

    # Measure what was saved, as it will be used: reloaded, inference mode.
    saved = keras.models.load_model(out / "model.keras")
    val_scores = pipeline.predict(saved, images[val])
    threshold, threshold_rule = M.choose_threshold(labels[val], val_scores)
    collapse = None
    try:
        M.check_not_collapsed(val_scores, threshold)
    except M.CollapsedModel as error:
        if not config.allow_collapse:
            raise UserError(str(error)) from None
        collapse = str(error)
        log.warning("%s", error)

    result = {
        "model": config.model,
        "input_size": size,
        "threshold": threshold,
        "threshold_rule": threshold_rule,
        "epochs_run": len(history.history["loss"]),
        "train_seconds": round(train_seconds, 1),
        "parameters": int(saved.count_params()),
        "collapsed": collapse,
        "validation": M.compute(labels[val], val_scores, threshold, [patients[i] for i in val]),
    }
    curves = {"validation": (labels[val], val_scores)}
    if len(test):
        test_scores = pipeline.predict(saved, images[test])
        result["test"] = M.compute(labels[test], test_scores, threshold, [patients[i] for i in test])
        curves["test"] = (labels[test], test_scores)
    (out / "model.json").write_text(json.dumps({
        "model_file": "model.keras", "kind": config.model, "input_size": size, "threshold": threshold,
        "labels": list(LABELS), "positive_label": POSITIVE_LABEL, "color_order": COLOR_ORDER,
        "preprocessing": {"name": PREPROCESSING_NAME, "size": size},
    }, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps({
        **asdict(config), "image_size": size, "data": str(data_dir.resolve()),
        "data_fingerprint": fingerprint(samples), "data_summary": describe(samples),
        "versions": _versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }, indent=2) + "\n")
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    plots.training_curves({k: list(map(float, v)) for k, v in history.history.items()}, out / "training_curves.png")
    headline = "test" if "test" in result else "validation"
    plots.confusion(result[headline], out / "confusion_matrix.png", f"{headline} patients")
    plots.roc(curves, out / "roc.png")
    (out / "report.md").write_text(_report(result, config, split, samples))
    return result


def _report(result: dict, config: FitConfig, split: Split, samples: Sequence[Sample]) -> str:
    lines = [
        f"# leukoscope training run: `{config.model}` model",
        "",
        f"> {DISCLAIMER}",
        "",
        f"Input {result['input_size']}x{result['input_size']} RGB, {result['parameters']:,} parameters, "
        f"{result['epochs_run']} epochs in {result['train_seconds']:.0f} s. Decision threshold "
        f"{result['threshold']:.3f} ({result['threshold_rule']}).",
        "",
        "| split | patients | images | weighted F1 | accuracy | sensitivity (ALL) | specificity | ROC AUC |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in ("validation", "test"):
        if name in result:
            m = result[name]
            n_patients = len({samples[i].patient for i in getattr(split, name)})
            lines.append(f"| {name} | {n_patients} | {m['images']} | {M.table_cells(m)} |")
    lines += [
        "",
        f"Training patients: {len({samples[i].patient for i in split.train})}, none of them in validation or test "
        "(see `split.json`). One split is one estimate: for new-patient performance use `trainer cv`.",
        "",
        "![training curves](training_curves.png)",
        "![confusion matrix](confusion_matrix.png)",
        "![ROC](roc.png)",
        "",
    ]
    if result["collapsed"]:
        lines.insert(4, f"**WARNING: {result['collapsed']}**\n")
    return "\n".join(lines)


def fit(data: Path, out: Path, config: FitConfig) -> dict:
    samples = scan(data)
    images, samples = load_arrays(samples, config.resolved_size())
    split = patient_split(samples, val_fraction=config.val_fraction, test_fraction=config.test_fraction, seed=config.seed)
    return train_on_split(images, samples, split, out, config, data)


def cross_validate(data: Path, out: Path, config: FitConfig, folds: int) -> dict:
    """Grouped k-fold: each fold trains on some donors and is scored on donors it never saw."""
    samples = scan(data)
    images, samples = load_arrays(samples, config.resolved_size())
    fold_metrics = []
    for number, split in enumerate(grouped_folds(samples, folds=folds, val_fraction=config.val_fraction, seed=config.seed)):
        log.info("fold %d/%d: %d train, %d validation, %d test images", number + 1, folds,
                 len(split.train), len(split.validation), len(split.test))
        result = train_on_split(images, samples, split, out / f"fold_{number}", config, data)
        fold_metrics.append(result["test"])
    summary = {"folds": folds, "model": config.model, "per_fold": fold_metrics, "summary": M.summarize_folds(fold_metrics)}
    (out / "cv.json").write_text(json.dumps(summary, indent=2) + "\n")
    rows = [f"| {key} | {v['mean']:.3f} | {v['std']:.3f} | {v['min']:.3f} | {v['max']:.3f} |" for key, v in summary["summary"].items()]
    (out / "cv_report.md").write_text("\n".join([
        f"# Grouped {folds}-fold cross-validation, `{config.model}` model", "", f"> {DISCLAIMER}", "",
        "Each fold is scored on patients its model never saw (whole donors left out).", "",
        "| metric | mean | std | min | max |", "| --- | --- | --- | --- | --- |", *rows, "",
    ]))
    return summary


def evaluate(run: Path, data: Path) -> dict:
    """Metrics of a run's saved model on any data folder, at the run's stored threshold."""
    import keras

    from trainer import pipeline

    meta_path = run / "model.json"
    if not meta_path.is_file() or not (run / "model.keras").is_file():
        raise UserError(f"{run} is not a complete training run (model.json or model.keras missing); run `trainer fit` first")
    meta = json.loads(meta_path.read_text())
    samples = scan(data)
    images, samples = load_arrays(samples, int(meta["input_size"]))
    try:
        model = keras.models.load_model(run / "model.keras")
    except Exception as error:  # Keras raises many types for a damaged file
        raise UserError(f"{run / 'model.keras'} cannot be loaded ({type(error).__name__}); retrain or restore it") from None
    scores = pipeline.predict(model, images)
    labels = np.array([s.label for s in samples])
    result = M.compute(labels, scores, float(meta["threshold"]), [s.patient for s in samples])
    result.update({"run": str(run), "data": str(data)})
    return result
