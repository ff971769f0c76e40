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
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from edge import DISCLAIMER, __version__
from edge.console import interactive, staged_folder
from edge.errors import UserError
from edge.preprocessing import DEFAULT_CONTRACT, CropContract
from trainer import default_input_size, plots
from trainer import metrics as M
from trainer.dataset import LABELS, Sample, describe, load_arrays, scan_sources
from trainer.run_folder import RunModel, SplitRecord
from trainer.split import Split, grouped_folds, patient_split

if TYPE_CHECKING:
    from trainer.compose import SmearComposer

log = logging.getLogger(__name__)


@dataclass
class FitConfig:
    model: str = "edge"
    epochs: int = 40
    image_size: int | None = None  # None: the model's default (``trainer.default_input_size``)
    batch_size: int = 32
    seed: int = 0
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    patience: int = 10
    steps_per_epoch: int | None = None  # None: one pass over the training images
    time_budget_min: float | None = None  # stop after the epoch that crosses this many minutes
    allow_collapse: bool = False
    #: BCCD-layout folder (frames + VOC boxes) scored as a lab never trained on; None: skipped.
    bccd: str | None = None
    #: A cell type held out of training and validation entirely, and scored as unseen.
    leave_out_type: str | None = None
    #: Share of C-NMC cells put back on a smear background and cut by the device's smear path
    #: (``trainer.compose``); 0 turns it off.
    compose_share: float = 0.5
    #: Raise the threshold until no normal cell type (of a source other than C-NMC) is called ALL on more
    #: than this share of its validation cells (``trainer.metrics.cap_per_type``); None: Youden alone.
    max_type_false_blast: float | None = 0.05
    #: How a cell type's loss is shared between its patients (``balanced_weights``): 1, by cell.
    patient_power: float = 1.0
    #: Domain-adversarial training (``source_targets``): the strength of the reversed gradient from a head
    #: that guesses the source of cells of one kind found in several sources; 0: off.
    source_adversary: float = 0.0
    #: Momentum of an exponential moving average of the weights (Polyak averaging), validated and kept in
    #: place of the last step's weights; 0: off.
    weight_average: float = 0.0

    def resolved_size(self) -> int:
        return self.image_size or default_input_size(self.model)

    def contract(self) -> CropContract:
        """The shipped contract's field of view (µm) at this model's input size."""
        size = self.resolved_size()
        return CropContract(size=size, um_per_px=DEFAULT_CONTRACT.field_um / size)


#: Share of the training loss for each side: ALL blasts half, normal cells half, the normal half
#: split evenly between sources and within a source between cell types. Without it PBC's 5,233 easy
#: negatives drown C-NMC's own normal donors, and "which lab" becomes the answer.
#: Within a cell type, patient ``p`` with ``n_p`` cells gets a share ``n_p ** patient_power`` of it: 1 (the
#: default) weighs every cell alike; 0.5 lets a donor of 400 cells count as 20 of one cell each, so
#: C-NMC's two large normal donors (H10, H14: 785 of its 834 normal cells) do not define "normal". Measured
#: by grouped 5-fold CV, 0.5 lowered new-patient AUC in every fold (0.730 vs 0.802): not the default.
def balanced_weights(samples: Sequence[Sample], patient_power: float = 1.0) -> np.ndarray:
    patients = Counter((s.label, s.source, s.cell_type, s.patient) for s in samples)
    mass: dict[tuple[int, str, str], float] = {}  # per cell type: the sum of its patients' n ** patient_power
    for (label, source, cell_type, _), n in patients.items():
        mass[(label, source, cell_type)] = mass.get((label, source, cell_type), 0.0) + n ** patient_power
    sources = Counter(label for label, _ in {(label, source) for label, source, _ in mass})
    types = Counter((label, source) for label, source, _ in mass)
    weights = np.empty(len(samples), np.float32)
    for i, s in enumerate(samples):
        group = (s.label, s.source, s.cell_type)
        n = patients[group + (s.patient,)]
        weights[i] = 0.5 / sources[s.label] / types[(s.label, s.source)] * (n ** patient_power / mass[group]) / n
    return weights * len(samples) / weights.sum()


#: C-NMC's class folders named as other sources' cell-type folders: a normal C-NMC cell is a B lymphocyte,
#: a C-NMC blast a blast, so the source adversary compares like with like.
SAME_KIND = {"hem": "lymphocyte", "all": "blast"}


def source_targets(samples: Sequence[Sample]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(source index, weight, source names) for the source adversary. Only cells of a kind that
    several sources hold take part (C-NMC's normal B-cells and PBC's lymphocytes): told apart, they
    name the lab, while a neutrophil told from a B-cell is morphology the model must keep. Each
    (kind, source) group weighs alike, so the head cannot win by guessing the larger source."""
    kinds = [SAME_KIND.get(s.cell_type, s.cell_type) for s in samples]
    holders: dict[str, set[str]] = {}
    for sample, kind in zip(samples, kinds):
        holders.setdefault(kind, set()).add(sample.source)
    shared = {kind for kind, sources in holders.items() if len(sources) >= 2}
    if not shared:
        raise UserError("--source-adversary needs one kind of cell from two sources (e.g. C-NMC's normal B-cells and "
                        "PBC's lymphocytes); add such a source or leave the option out")
    names = sorted({s.source for s, kind in zip(samples, kinds) if kind in shared})
    groups = Counter((kind, s.source) for s, kind in zip(samples, kinds) if kind in shared)
    index = np.array([names.index(s.source) if s.source in names else 0 for s in samples], np.int32)
    weights = np.array([1.0 / groups[(kind, s.source)] / len(holders[kind]) / len(shared) if kind in shared else 0.0
                        for s, kind in zip(samples, kinds)], np.float32)
    # Mean 1 over all cells, as the decision loss's weights: W then scales a push as large as the decision's
    # own (with mean 1 over the few cells that take part, Keras's per-batch mean diluted it ~6x).
    return index, weights * len(weights) / weights.sum(), names


def by_group(samples: Sequence[Sample], scores: np.ndarray, threshold: float) -> dict:
    """Per source and cell type: cells, and the share called ALL (sensitivity for blasts,
    false-blast rate for every normal type)."""
    out: dict = {}
    for key in sorted({(s.source, s.cell_type) for s in samples}):
        index = [i for i, s in enumerate(samples) if (s.source, s.cell_type) == key]
        called = float(np.mean(np.asarray(scores)[index] >= threshold))
        out[f"{key[0]}/{key[1]}"] = {"cells": len(index), "called_all": round(called, 4),
                                     "blast": samples[index[0]].label == 1}
    return out


def other_normal_types(samples: Sequence[Sample]) -> dict[str, list[int]]:
    """Positions of the normal cells of every type but C-NMC's own, by "source/cell type": the types the
    threshold's per-type cap watches (C-NMC's normal donors are what the model must learn to tell apart)."""
    types: dict[str, list[int]] = {}
    for k, sample in enumerate(samples):
        if sample.label == 0 and sample.cell_type not in LABELS:
            types.setdefault(f"{sample.source}/{sample.cell_type}", []).append(k)
    return types


def decision_threshold(labels: np.ndarray, scores: np.ndarray, samples: Sequence[Sample], weights: np.ndarray,
                       max_type_false_blast: float | None) -> tuple[float, str]:
    """(threshold, rule) chosen on validation cells: max Youden J under ``weights``, then raised by the
    per-type cap (``metrics.cap_per_type``) over the normal types of other sources."""
    threshold, rule = M.choose_threshold(labels, scores, weights)
    return M.cap_per_type(threshold, rule, {name: scores[ks] for name, ks in other_normal_types(samples).items()},
                          max_type_false_blast)


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
                   sources: dict, composer: "SmearComposer | None" = None) -> dict:
    """Train, select the threshold, measure, plot and report; returns metrics.json's content.
    ``composer``: the smear backgrounds training used, to score C-NMC validation cells on a smear too."""
    import keras

    from trainer import crosslab, pipeline
    from trainer.models import AdversaryRamp, BatchNormRecalibration, build, with_source_head

    TimeBudget = _time_budget_callback()
    out.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(config.seed)
    labels = np.array([s.label for s in samples])
    patients = [s.patient for s in samples]
    size = config.resolved_size()
    train, val, test = (np.array(getattr(split, n), dtype=int) for n in ("train", "validation", "test"))
    contract = config.contract()

    SplitRecord(split.as_record(samples)).write(out)
    steps = config.steps_per_epoch or math.ceil(len(train) / config.batch_size)
    val_samples = [samples[i] for i in val]
    val_weights = balanced_weights(val_samples, config.patient_power)  # validation loss and the threshold alike
    train_weights = balanced_weights([samples[i] for i in train], config.patient_power)
    train_targets, val_targets = labels[train], labels[val]
    metrics = [keras.metrics.AUC(name="auc"), keras.metrics.BinaryAccuracy(name="accuracy")]
    with _strategy().scope():
        classifier, optimizer = build(config.model, size, config.weight_average)
        model = classifier
        if config.source_adversary > 0:
            source, source_weights, source_names = source_targets(samples)
            log.info("source adversary (strength %g) on %d cells of %s", config.source_adversary,
                     np.count_nonzero(source_weights[train]), " / ".join(source_names))
            model = with_source_head(classifier, len(source_names), config.source_adversary)
            train_targets = {"p_all": labels[train].astype(np.float32), "source": source[train]}
            val_targets = {"p_all": labels[val].astype(np.float32), "source": source[val]}
            train_weights = {"p_all": train_weights, "source": source_weights[train]}
            val_loss_weights = {"p_all": val_weights, "source": source_weights[val]}
            model.compile(optimizer=optimizer, loss={"p_all": "binary_crossentropy", "source": "sparse_categorical_crossentropy"},
                          metrics={"p_all": metrics})
        else:
            val_loss_weights = val_weights
            model.compile(optimizer=optimizer, loss="binary_crossentropy", metrics=metrics)
    monitor = "val_p_all_auc" if model is not classifier else "val_auc"
    best_path = out / "best.keras"
    train_data = pipeline.dataset(images[train], train_targets, batch_size=config.batch_size, training=True,
                                  seed=config.seed, weights=train_weights)
    # The averaged weights are put in the model (with batch-norm statistics of their own, from training's own
    # batches) for validation and at each epoch's end, before the callbacks that judge or keep it.
    callbacks = [keras.callbacks.SwapEMAWeights(swap_on_epoch=True), BatchNormRecalibration(train_data)] \
        if config.weight_average else []
    callbacks += [
        keras.callbacks.ModelCheckpoint(best_path, monitor=monitor, mode="max", save_best_only=True),
        keras.callbacks.EarlyStopping(monitor=monitor, mode="max", patience=config.patience, restore_best_weights=True),
        keras.callbacks.ReduceLROnPlateau(monitor=monitor, mode="max", factor=0.5, patience=max(2, config.patience // 3)),
        keras.callbacks.CSVLogger(out / "history.csv"),
    ]
    if config.time_budget_min:
        callbacks.append(TimeBudget(config.time_budget_min * 60))
    if model is not classifier:
        callbacks.append(AdversaryRamp(model.get_layer("reverse_gradient"), config.epochs))
    started = time.monotonic()
    history = model.fit(
        train_data,
        validation_data=pipeline.dataset(images[val], val_targets, batch_size=64, training=False, seed=config.seed,
                                         weights=val_loss_weights),
        epochs=config.epochs, steps_per_epoch=steps,
        # A bar per epoch on a terminal; one plain line per epoch in a file or the journal. The
        # dataset shuffles itself (shuffle=True would only earn a warning that Keras ignores it).
        callbacks=callbacks, verbose=1 if interactive() else 2, shuffle=False,
    )
    train_seconds = time.monotonic() - started
    classifier.save(out / "model.keras")  # the decision alone: a source head is training's business
    best_path.unlink(missing_ok=True)

    # Measure what was saved, as it will be used: reloaded, inference mode.
    saved = keras.models.load_model(out / "model.keras")
    val_scores = pipeline.predict(saved, images[val])
    threshold, threshold_rule = decision_threshold(labels[val], val_scores, val_samples, val_weights, config.max_type_false_blast)
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
        "validation_by_group": by_group(val_samples, val_scores, threshold),
        "contract": contract.to_manifest(),
    }
    cnmc_val = [i for i, s in enumerate(val_samples) if s.cell_type in LABELS]
    if cnmc_val and len({val_samples[i].label for i in cnmc_val}) == 2:
        result["validation_cnmc"] = M.compute(labels[val][cnmc_val], val_scores[cnmc_val], threshold)
    
    score = lambda crops: pipeline.predict(saved, crops)  # noqa: E731
    histograms = {name: val_scores[[i for i, s in enumerate(val_samples) if f"{s.source}/{s.cell_type}" == name]]
                  for name in result["validation_by_group"]}
    normal = [i for i, s in enumerate(val_samples) if s.label == 0]
    suspects = [(float(val_scores[i]), images[val[i]], f"{val_samples[i].source}/{val_samples[i].cell_type}") for i in normal]
    if config.bccd:
        log.info("scoring BCCD white cells (a lab never trained on)")
        result["bccd"], bccd_crops, bccd_scores = crosslab.bccd_false_blasts(score, Path(config.bccd), contract, threshold)
        histograms["BCCD (never trained on)"] = bccd_scores
        suspects += [(float(p), crop, "BCCD") for p, crop in zip(bccd_scores, bccd_crops)]
    robust = [i for i, s in enumerate(val_samples)][:: max(1, len(val_samples) // 400)]
    log.info("measuring scale and stain invariance on %d validation cells", len(robust))
    result["invariance"] = crosslab.invariance(score, [val_samples[i] for i in robust], contract, threshold,
                                               val_scores[robust], seed=config.seed)
    if composer is not None and cnmc_val:
        log.info("scoring C-NMC validation cells on a smear, through the device's smear path")
        result["validation_cnmc_on_smear"] = crosslab.on_smear(score, [val_samples[i] for i in cnmc_val], composer,
                                                               contract, threshold)
    curves = {"validation": (labels[val], val_scores)}
    if len(test):
        test_scores = pipeline.predict(saved, images[test])
        result["test"] = M.compute(labels[test], test_scores, threshold, [patients[i] for i in test])
        curves["test"] = (labels[test], test_scores)
        cnmc_test = [k for k, i in enumerate(test) if samples[i].cell_type in LABELS]
        if cnmc_test and len({labels[test][k] for k in cnmc_test}) == 2:  # the new-patient C-NMC estimate
            result["test_cnmc"] = M.compute(labels[test][cnmc_test], test_scores[cnmc_test], threshold)
        result["test_by_group"] = by_group([samples[i] for i in test], test_scores, threshold)
    RunModel(kind=config.model, input_size=size, threshold=threshold, contract=contract).write(out)
    (out / "config.json").write_text(json.dumps({
        **asdict(config), "image_size": size, "sources": sources,
        "data_fingerprint": fingerprint(samples), "data_summary": describe(samples),
        "versions": _versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }, indent=2) + "\n")
    plots.training_curves({k.replace("p_all_", ""): list(map(float, v)) for k, v in history.history.items()},
                          out / "training_curves.png")
    headline = "test" if "test" in result else "validation"
    plots.confusion(result[headline], out / "confusion_matrix.png", f"{headline} patients")
    plots.roc(curves, out / "roc.png")
    plots.score_histograms(histograms, threshold, out / "score_histograms.png")
    worst = sorted(suspects, key=lambda t: -t[0])[:24]
    plots.crop_grid(np.stack([t[1] for t in worst]) if worst else np.zeros((0, size, size, 3), np.uint8),
                    [f"{t[2]} {t[0]:.2f}" for t in worst], out / "false_blasts.png",
                    "normal cells with the highest P(ALL): validation and never-seen labs")
    _write_report(out, result, config, split, samples)
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
    if "validation_cnmc" in result:
        lines.append(f"| validation, C-NMC cells only | | {result['validation_cnmc']['images']} | "
                     f"{M.table_cells(result['validation_cnmc'])} |")
    lines += ["", "## Where it holds", "",
              "Share of cells called ALL, per source and cell type (validation cells of patients never trained on; "
              "for blasts this is the sensitivity, for every normal type the false-blast rate):", "",
              "| source / cell type | cells | called ALL |", "| --- | --- | --- |"]
    lines += [f"| {name} | {g['cells']} | {g['called_all']:.1%} |" for name, g in result["validation_by_group"].items()]
    if "bccd" in result:
        b = result["bccd"]
        lines.append(f"| BCCD white cells (a lab never trained on) | {b['white_cells_found']} | {b['false_blast_rate']:.1%} |")
    if "left_out_type" in result:
        t = result["left_out_type"]
        lines.append(f"| {t['cell_type']} (left out of training entirely) | {t['cells']} | {t['called_all']:.1%} |")
    smear = result.get("validation_cnmc_on_smear")
    if smear:
        lines += ["", f"C-NMC validation cells put on a smear and cut by the device's smear path ({smear['images']} cells): "
                      f"{M.summary_line(smear)}."]
    inv = result.get("invariance", {})
    if inv:
        lines += ["", f"Same decision after resampling to 0.7x / 1.4x pixel scale (with the matching µm per pixel): "
                      f"{inv['scale_0.7x']:.1%} / {inv['scale_1.4x']:.1%}; after a stain and white-balance shift: "
                      f"{inv['stain_shift']:.1%} ({inv['cells']} validation cells)."]
    lines += [
        "",
        f"Training patients: {len({samples[i].patient for i in split.train})}, none of them in validation or test "
        "(see `split.json`). One split is one estimate: for new-patient performance use `trainer cv`.",
        "",
        "![P(ALL) per source and cell type](score_histograms.png)",
        "![normal cells with the highest P(ALL)](false_blasts.png)",
        "![training curves](training_curves.png)",
        "![confusion matrix](confusion_matrix.png)",
        "![ROC](roc.png)",
        "",
    ]
    if result["collapsed"]:
        lines.insert(4, f"**WARNING: {result['collapsed']}**\n")
    return "\n".join(lines)


def _write_report(out: Path, result: dict, config: FitConfig, split: Split, samples: Sequence[Sample]) -> None:
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "report.md").write_text(_report(result, config, split, samples))


def _load(data: Sequence[str | Path], config: FitConfig) -> tuple[np.ndarray, list[Sample], dict, list[Sample], "SmearComposer | None"]:
    """(images, samples, sources record, left-out samples) of every source, cropped by the contract."""
    from trainer.compose import SmearComposer

    samples, sources = scan_sources(data)
    left_out: list[Sample] = []
    if config.leave_out_type:
        left_out = [s for s in samples if s.cell_type == config.leave_out_type]
        if not left_out:
            raise UserError(f"--leave-out-type {config.leave_out_type}: no such cell type in the data")
        samples = [s for s in samples if s.cell_type != config.leave_out_type]
    smears = [s for s in samples if s.cell_type not in LABELS]
    composer = SmearComposer.from_samples(smears, share=config.compose_share) if config.compose_share > 0 else None
    if composer:
        log.info("%.0f%% of C-NMC cells go onto %d smear backgrounds (%s) and through the device's smear path",
                 100 * config.compose_share, len(composer.backgrounds), smears[0].source)
        for record in sources.values():
            if record["layout"] == "C-NMC":
                record["on_smear"] = {"share": config.compose_share, "backgrounds_from": smears[0].source,
                                      "backgrounds": len(composer.backgrounds), "um_per_px": composer.um_per_px}
    images, samples = load_arrays(samples, config.contract(), transform=composer)
    return images, samples, sources, left_out, composer


def fit(data: Sequence[str | Path], out: Path, config: FitConfig, overwrite: bool = False) -> dict:
    """Train one model on a patient split; ``out`` appears only once the run is complete."""
    with staged_folder(out, overwrite) as staging:
        images, samples, sources, left_out, composer = _load(data, config)
        split = patient_split(samples, val_fraction=config.val_fraction, test_fraction=config.test_fraction, seed=config.seed)
        result = train_on_split(images, samples, split, staging, config, sources, composer)
        if left_out:
            import keras

            from trainer import pipeline

            held, held_samples = load_arrays(left_out, config.contract())
            scores = pipeline.predict(keras.models.load_model(staging / "model.keras"), held)
            result["left_out_type"] = {"cell_type": config.leave_out_type, "cells": len(held_samples),
                                       "called_all": round(float(np.mean(scores >= result["threshold"])), 4)}
            _write_report(staging, result, config, split, samples)
    return result


def cross_validate(data: Sequence[str | Path], out: Path, config: FitConfig, folds: int, overwrite: bool = False,
                   only: Sequence[int] | None = None) -> dict:
    """Grouped k-fold: each fold trains on some donors and is scored on donors it never saw.
    ``only``: the folds (0-based) to run, of the same split. ``out`` appears only once every fold
    run and the summary are written."""
    with staged_folder(out, overwrite) as staging:
        images, samples, sources, _, composer = _load(data, config)
        fold_metrics, bccd_rates = [], []
        for number, split in enumerate(grouped_folds(samples, folds=folds, val_fraction=config.val_fraction, seed=config.seed)):
            if only is not None and number not in only:
                continue
            log.info("fold %d/%d: %d train, %d validation, %d test images", number + 1, folds,
                     len(split.train), len(split.validation), len(split.test))
            result = train_on_split(images, samples, split, staging / f"fold_{number}", config, sources, composer)
            fold_metrics.append(result.get("test_cnmc", result["test"]))
            if "bccd" in result:
                bccd_rates.append(result["bccd"]["false_blast_rate"])
        summary = {"folds": folds, "folds_run": list(only) if only is not None else list(range(folds)), "model": config.model,
                   "per_fold": fold_metrics, "summary": M.summarize_folds(fold_metrics),
                   "bccd_false_blast_rate_per_fold": bccd_rates}
        (staging / "cv.json").write_text(json.dumps(summary, indent=2) + "\n")
        rows = [f"| {key} | {v['mean']:.3f} | {v['std']:.3f} | {v['min']:.3f} | {v['max']:.3f} |" for key, v in summary["summary"].items()]
        (staging / "cv_report.md").write_text("\n".join([
            f"# Grouped {folds}-fold cross-validation, `{config.model}` model", "", f"> {DISCLAIMER}", "",
            *([f"Folds run: {', '.join(map(str, only))} of {folds} (the others were not trained).", ""] if only is not None else []),
            "Each fold is scored on patients its model never saw (whole donors left out); the metrics are those of "
            "the C-NMC cells (ALL blasts vs normal B-cells) among them.", "",
            "| metric | mean | std | min | max |", "| --- | --- | --- | --- | --- |", *rows, "",
            *([f"BCCD white cells (a lab never trained on) called ALL, per fold: {', '.join(f'{r:.1%}' for r in bccd_rates)}", ""]
              if bccd_rates else []),
        ]))
    return summary


def evaluate(run: Path, data: Sequence[str | Path]) -> dict:
    """Metrics of a run's saved model on any data folder, at the run's stored threshold."""
    import keras

    from trainer import pipeline

    if not (run / "model.json").is_file() or not (run / "model.keras").is_file():
        raise UserError(f"{run} is not a complete training run (model.json or model.keras missing); run `trainer fit` first")
    meta = RunModel.read(run)
    contract = meta.contract
    images, samples = load_arrays(scan_sources(data, require_both=False)[0], contract)
    try:
        model = keras.models.load_model(run / "model.keras")
    except Exception as error:  # Keras raises many types for a damaged file
        raise UserError(f"{run / 'model.keras'} cannot be loaded ({type(error).__name__}); retrain or restore it") from None
    scores = pipeline.predict(model, images)
    labels = np.array([s.label for s in samples])
    result = M.compute(labels, scores, meta.threshold, [s.patient for s in samples])
    result.update({"by_group": by_group(samples, scores, meta.threshold), "run": str(run),
                   "data": [str(d) for d in data], "seen_in_training": seen_in_training(run, samples)})
    return result


def seen_in_training(run: Path, samples: Sequence[Sample]) -> dict | None:
    """How many of ``samples`` the run trained on, or come from its training patients; None when
    the run's ``split.json`` is not at hand. Numbers on such cells are not new-patient numbers: a
    model is always better on the people it has seen, so they must not pass for an estimate."""
    if not (run / "split.json").is_file():
        return None
    record = SplitRecord.read(run)
    paths, patients = record.paths("train"), record.patients("train")
    seen = [s for s in samples if s.patient in patients or str(s.path.resolve()) in paths]
    return {"cells": len(seen), "patients": len({s.patient for s in seen})}


def seen_warning(result: dict, what: str) -> str | None:
    """The one line a person must read before trusting an evaluation; None when it is clean."""
    seen = result.get("seen_in_training")
    if seen is None:
        return f"cannot tell whether these cells include {what}'s training patients (its split.json is not here)"
    if seen["cells"]:
        return (f"{seen['cells']} of {result['images']} cells come from {seen['patients']} of {what}'s training "
                "patients: these are not new-patient numbers; evaluate on patients it never saw")
    return None
