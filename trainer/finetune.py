"""``trainer fit --finetune RUN``: adapt a trained run to one lab's microscope from a few cells its
people labelled (``edge export-reviews``), and write a normal run folder.

Why this shape:

* **Start from RUN's weights, same crop contract.** The site's cells are cut with this leukoscope's
  contract at RUN's input size; a run trained under another contract would be fed inputs that mean
  something else, so it is refused (one line) rather than fine-tuned into nonsense.
* **Few epochs, low learning rate, batch-norm statistics frozen.** A site gives tens to hundreds of
  cells; a full-rate update or new batch statistics from them would overwrite what RUN learnt from
  thousands. Frozen batch norm also keeps the int8 export's folded scales close to RUN's.
* **Replay.** The site's cells are mixed with a stratified sample of RUN's own training cells (from its
  ``split.json``), weighted like ``trainer fit`` (ALL half, normal half, each shared between sources), so
  that a healthy site's hundred normal cells cannot teach the model to forget what a blast looks like.
* **An honest threshold.** RUN's threshold is kept unless the site's held-out patients hold at least
  ``trainer.metrics.MIN_CELLS_FOR_THRESHOLD`` cells of each class; ``threshold_rule`` says which rule
  was used and why.
* **A normal run folder** (``model.keras``, ``model.json``, ``split.json``, ``config.json`` with
  ``finetuned_from``, ``metrics.json``, ``report.md``), so ``quantize export`` and the device's bundle
  checks apply unchanged. Its ``split.json`` lists RUN's whole training side (the model has seen those
  patients) plus the site's training cells, so "not new-patient numbers" warnings stay true.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from edge import DISCLAIMER
from edge.bundle import sha256_file
from edge.console import interactive, staged_folder
from edge.errors import DataError, UserError
from edge.preprocessing import DEFAULT_CONTRACT, CropContract
from trainer import metrics as M
from trainer import plots
from trainer.dataset import LABELS, Sample, describe, load_arrays, scan_sources
from trainer.fit import _time_budget_callback, _versions, balanced_weights, by_group, fingerprint
from trainer.run_folder import MODEL_FILE, Run, RunModel, SplitRecord
from trainer.split import Split, patient_split

log = logging.getLogger(__name__)

#: Fewest site cells worth a fine-tune: below this the update is noise.
MIN_SITE_CELLS = 10


@dataclass
class FinetuneConfig:
    epochs: int = 6
    learning_rate: float = 1e-4
    batch_size: int = 32
    seed: int = 0
    #: Replayed RUN training cells per site training cell, and at least ``min_replay`` of them.
    replay_ratio: float = 3.0
    min_replay: int = 200
    #: RUN validation cells (stratified) scored before and after: the forgetting check.
    replay_validation: int = 400
    #: Share of the site's patients held out, when the site holds enough cells to choose a threshold.
    val_fraction: float = 0.2
    steps_per_epoch: int | None = None
    time_budget_min: float | None = None
    allow_collapse: bool = False


def contract_for(kind: str, size: int) -> CropContract:
    """The contract this leukoscope cuts cells with for a model of this input size (as ``FitConfig``)."""
    return CropContract(size=size, um_per_px=DEFAULT_CONTRACT.field_um / size)


def read_base(run_folder: Path) -> Run:
    """RUN, complete and cut with this leukoscope's contract; one line naming the problem otherwise."""
    if not run_folder.is_dir():
        raise UserError(f"--finetune {run_folder} does not exist; give a run folder written by `trainer fit`")
    run = Run.read(run_folder)
    expected = contract_for(run.model.kind, run.model.input_size)
    if run.model.contract != expected:
        differ = [k for k, v in expected.to_manifest()["params"].items() if run.model.contract.to_manifest()["params"][k] != v]
        raise UserError(f"{run_folder / 'model.json'}: the run's crop contract differs from the one this leukoscope cuts the "
                        f"site's cells with ({', '.join(differ)}); fine-tune a run trained with this version, or train anew")
    records = {side: run.split.sides.get(side, {}).get("samples", []) for side in ("train", "validation")}
    for side, rows in records.items():
        if not rows:
            raise UserError(f"{run_folder / 'split.json'} lists no {side} cells; the replay needs them (retrain the run)")
        absent = [r["path"] for r in rows if not Path(r["path"]).is_file()]
        if absent:
            raise UserError(f"{len(absent)} of the run's {'training' if side == 'train' else side} images are not here (e.g. {absent[0]}): the replay reads "
                            "them at the paths in its split.json; restore the training data there")
    return run


def stratified(samples: Sequence[Sample], count: int, seed: int) -> list[Sample]:
    """``count`` samples, each (source, cell type) group in proportion but with at least one cell."""
    if count >= len(samples):
        return list(samples)
    rng = np.random.default_rng(seed)
    groups: dict[tuple[str, str], list[Sample]] = defaultdict(list)
    for s in samples:
        groups[(s.source, s.cell_type)].append(s)
    chosen: list[Sample] = []
    for key in sorted(groups):
        members = groups[key]
        take = max(1, round(count * len(members) / len(samples)))
        chosen += [members[i] for i in sorted(rng.choice(len(members), min(take, len(members)), replace=False))]
    return chosen


def _site_samples(data: Sequence[str | Path]) -> tuple[list[Sample], dict]:
    """The site's labelled cells; patients prefixed with their source so a site's "1" is never C-NMC's "1"."""
    samples, sources = scan_sources(data, require_both=False)
    samples = [Sample(s.path, s.label, s.patient if s.patient.startswith(f"{s.source}:") else f"{s.source}:{s.patient}",
                      s.source, s.cell_type, s.um_per_px) for s in samples]
    return samples, sources


def _site_split(site: list[Sample], config: FinetuneConfig) -> tuple[list[Sample], list[Sample], str]:
    """(train, validation, why): the site's patients held out only when they can set a threshold."""
    counts = np.bincount([s.label for s in site], minlength=2)
    needed = math.ceil(M.MIN_CELLS_FOR_THRESHOLD / config.val_fraction)
    if counts.min() < needed:
        return site, [], (f"the site gives {counts[1]} blast and {counts[0]} normal cells; fewer than {needed} of a class, "
                          "so all of them train and none are held out")
    try:
        split = patient_split(site, val_fraction=config.val_fraction, seed=config.seed)
    except DataError as error:
        return site, [], f"the site's cells cannot be split by patient ({error}); all of them train"
    return [site[i] for i in split.train], [site[i] for i in split.validation], \
        f"{config.val_fraction:.0%} of the site's patients held out ({len(split.validation)} cells)"


def _replay_composer(run: Run, train: Sequence[Sample]):
    """RUN's own smear composition of C-NMC cells (``trainer.compose``), so replayed cells look as in RUN's training."""
    from trainer.compose import SmearComposer

    share = float(run.config.get("compose_share", 0) or 0)
    smears = [s for s in train if s.cell_type not in LABELS]
    return SmearComposer.from_samples(smears, share=share) if share > 0 and smears else None


def train(base_model: Path, images: np.ndarray, labels: np.ndarray, weights: np.ndarray, val: tuple[np.ndarray, np.ndarray],
          config: FinetuneConfig, history_csv: Path | None = None):
    """RUN's model, updated on ``images`` for a few epochs at a low rate with batch norm frozen;
    returns (model, history dict, seconds). The benchmark calls this directly on arrays it has loaded once."""
    import keras

    from trainer import pipeline

    keras.utils.set_random_seed(config.seed)
    model = keras.models.load_model(base_model)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False  # Keras 3: a frozen batch norm also runs in inference mode
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=config.learning_rate), loss="binary_crossentropy",
                  metrics=[keras.metrics.AUC(name="auc"), keras.metrics.BinaryAccuracy(name="accuracy")])
    callbacks = [keras.callbacks.CSVLogger(history_csv)] if history_csv else []
    if config.time_budget_min:
        callbacks.append(_time_budget_callback()(config.time_budget_min * 60))
    steps = config.steps_per_epoch or math.ceil(len(images) / config.batch_size)
    started = time.monotonic()
    history = model.fit(
        pipeline.dataset(images, labels, batch_size=config.batch_size, training=True, seed=config.seed, weights=weights),
        validation_data=pipeline.dataset(val[0], val[1], batch_size=64, training=False, seed=config.seed),
        epochs=config.epochs, steps_per_epoch=steps, callbacks=callbacks, verbose=1 if interactive() else 2, shuffle=False)
    return model, {k: list(map(float, v)) for k, v in history.history.items()}, time.monotonic() - started


def finetune(run_folder: Path, data: Sequence[str | Path], out: Path, config: FinetuneConfig, overwrite: bool = False) -> dict:
    """Fine-tune RUN on the site's cells in ``data``; ``out`` appears only once the run is complete."""
    import keras

    from trainer import pipeline

    run = read_base(run_folder)
    if config.epochs < 1 or config.batch_size < 1:
        raise UserError("--epochs and --batch-size must be at least 1")
    if not 0 < config.learning_rate < 0.1:
        raise UserError("--learning-rate must be between 0 and 0.1 (fine-tuning wants a low one, e.g. 1e-4)")
    contract = run.model.contract
    with staged_folder(out, overwrite) as staging:
        site, site_sources = _site_samples(data)
        site_images, site = load_arrays(site, contract)
        if len(site) < MIN_SITE_CELLS:
            raise UserError(f"the site data holds {len(site)} usable cells; fine-tuning needs at least {MIN_SITE_CELLS} "
                            "(review more cells on the device, then `edge export-reviews` again)")
        classes = {s.label for s in site}
        if len(classes) == 1:
            log.warning("the site data holds only %s cells; the replay of the run's cells gives the other class",
                        "ALL blast" if 1 in classes else "normal")
        site_train, site_val, site_split_rule = _site_split(site, config)
        index = {id(s): i for i, s in enumerate(site)}
        site_train_images = site_images[[index[id(s)] for s in site_train]]

        run_train = run.split.samples("train", run.folder)
        run_val = run.split.samples("validation", run.folder)
        replay_count = max(config.min_replay, round(config.replay_ratio * len(site_train)))
        replay = stratified(run_train, replay_count, config.seed)
        log.info("fine-tuning on %d site cells and %d replayed cells of %s's training data", len(site_train), len(replay), run_folder)
        replay_images, replay = load_arrays(replay, contract, transform=_replay_composer(run, run_train))
        check = stratified(run_val, config.replay_validation, config.seed + 1)
        check_images, check = load_arrays(check, contract)

        train_samples = list(site_train) + list(replay)
        train_images = np.concatenate([site_train_images, replay_images])
        labels = np.array([s.label for s in train_samples])
        val_samples = list(check) + list(site_val)
        val_images = np.concatenate([check_images] + ([site_images[[index[id(s)] for s in site_val]]] if site_val else []))
        val_labels = np.array([s.label for s in val_samples])

        model, history, seconds = train(run.folder / MODEL_FILE, train_images, labels, balanced_weights(train_samples),
                                        (val_images, val_labels), config, staging / "history.csv")
        model.save(staging / MODEL_FILE)
        saved = keras.models.load_model(staging / MODEL_FILE)
        before_model = keras.models.load_model(run.folder / MODEL_FILE)
        after = pipeline.predict(saved, val_images)
        before = pipeline.predict(before_model, val_images)
        site_after = pipeline.predict(saved, site_images)
        site_before = pipeline.predict(before_model, site_images)

        n_site_val = np.bincount([s.label for s in site_val], minlength=2) if site_val else np.zeros(2, int)
        if n_site_val.min() >= M.MIN_CELLS_FOR_THRESHOLD:
            k = len(check)
            threshold, rule = M.choose_threshold(val_labels[k:], after[k:])
            rule += f" of the site ({len(site_val)} cells)"
        else:
            threshold = run.model.threshold
            held = (f"the site's held-out patients give {n_site_val.min()} cells of a class" if site_val
                    else "no site patients were held out")
            rule = (f"kept from {run_folder.name} ({run.threshold_rule}): {held}, and choosing one needs "
                    f"{M.MIN_CELLS_FOR_THRESHOLD} held-out cells of each class")
        collapse = None
        try:
            M.check_not_collapsed(after, threshold)
        except M.CollapsedModel as error:
            if not config.allow_collapse:
                raise UserError(str(error)) from None
            collapse = str(error)
            log.warning("%s", error)

        size = run.model.input_size
        site_train_set = {id(s) for s in site_train}
        trained = [i for i, s in enumerate(site) if id(s) in site_train_set]
        result = {
            "model": run.model.kind,
            "input_size": size,
            "threshold": threshold,
            "threshold_rule": rule,
            "finetuned_from": str(run.folder.resolve()),
            "base_threshold": run.model.threshold,
            "epochs_run": len(history.get("loss", [])),
            "train_seconds": round(seconds, 1),
            "parameters": int(saved.count_params()),
            "collapsed": collapse,
            "site": {"cells": len(site), "blast": int(sum(s.label for s in site)), "normal": int(sum(1 - s.label for s in site)),
                     "train": len(site_train), "validation": len(site_val), "split": site_split_rule,
                     "replayed": len(replay)},
            "validation": M.compute(val_labels, after, threshold, [s.patient for s in val_samples]),
            "validation_by_group": by_group(val_samples, after, threshold),
            "base_validation_by_group": by_group(val_samples, before, run.model.threshold),
            "site_trained_on": {"before": by_group([site[i] for i in trained], site_before[trained], run.model.threshold),
                                "after": by_group([site[i] for i in trained], site_after[trained], threshold)},
            "contract": contract.to_manifest(),
        }
        if site_val:
            k = len(check)
            result["site_validation"] = {"before": M.compute(val_labels[k:], before[k:], run.model.threshold),
                                         "after": M.compute(val_labels[k:], after[k:], threshold)}

        whole_train = list(run_train) + list(site_train)
        everything = whole_train + val_samples
        split = Split(train=list(range(len(whole_train))), validation=list(range(len(whole_train), len(everything))), test=[])
        SplitRecord(split.as_record(everything)).write(staging)
        RunModel(kind=run.model.kind, input_size=size, threshold=threshold, contract=contract).write(staging)
        (staging / "config.json").write_text(json.dumps({
            **asdict(config), "model": run.model.kind, "image_size": size,
            "finetuned_from": {"run": str(run.folder.resolve()), "model_sha256": sha256_file(run.folder / MODEL_FILE),
                               "threshold": run.model.threshold, "data_fingerprint": run.config.get("data_fingerprint")},
            "sources": {**run.config.get("sources", {}), **site_sources},
            "data_fingerprint": fingerprint(train_samples), "data_summary": describe(whole_train),
            "versions": _versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }, indent=2) + "\n")
        plots.training_curves(history, staging / "training_curves.png")
        plots.confusion(result["validation"], staging / "confusion_matrix.png", "validation cells")
        plots.roc({"validation": (val_labels, after)}, staging / "roc.png")
        (staging / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        (staging / "report.md").write_text(report(result, run_folder))
    return result


def report(result: dict, run_folder: Path) -> str:
    site = result["site"]
    lines = [
        f"# leukoscope fine-tuned run: `{result['model']}` model adapted to a site", "", f"> {DISCLAIMER}", "",
        f"Started from `{run_folder}` (its `model.keras`, same crop contract). {site['cells']} site cells "
        f"({site['blast']} ALL blast, {site['normal']} normal): {site['split']}. Trained on {site['train']} of them mixed with "
        f"{site['replayed']} replayed cells of the run's own training data, {result['epochs_run']} epochs in "
        f"{result['train_seconds']:.0f} s, batch norm frozen.", "",
        f"Decision threshold {result['threshold']:.3f} ({result['threshold_rule']}).", "",
        "## Before and after", "",
        "Share of cells called ALL, per source and cell type: for blasts the sensitivity, for every normal type the "
        "false-blast rate. The run's validation cells (a stratified sample; patients neither model trained on) check that "
        "nothing was forgotten; the site's cells it trained on are not an estimate of anything, only a sign it learnt.", "",
        "| cells | n | before | after |", "| --- | --- | --- | --- |",
    ]
    for name, g in result["validation_by_group"].items():
        b = result["base_validation_by_group"][name]
        lines.append(f"| validation {name} | {g['cells']} | {b['called_all']:.1%} | {g['called_all']:.1%} |")
    for name, g in result["site_trained_on"]["after"].items():
        b = result["site_trained_on"]["before"][name]
        lines.append(f"| site, trained on: {name} | {g['cells']} | {b['called_all']:.1%} | {g['called_all']:.1%} |")
    if "site_validation" in result:
        sv = result["site_validation"]
        lines += ["", f"Site patients held out ({sv['after']['images']} cells): before {M.summary_line(sv['before'])}; "
                      f"after {M.summary_line(sv['after'])}."]
    lines += ["", "How much a few site cells help on the rest of a lab's cells is measured by "
                  "`benchmarks/bench_finetune.py` (README, Measured performance).", "",
              "![training curves](training_curves.png)", "![confusion matrix](confusion_matrix.png)", "![ROC](roc.png)", ""]
    if result["collapsed"]:
        lines.insert(4, f"**WARNING: {result['collapsed']}**\n")
    return "\n".join(lines)
