"""``quantize export``: a training run becomes a full-integer int8 model bundle, parity measured.

Calibration crops come from the run's *training* patients (stratified by class and
patient), through the same ``edge.preprocessing`` as training and the device. Parity is
measured on the run's validation patients by the device's own ``Classifier``, and an
export that loses too much is refused unless the user says otherwise.
"""

from __future__ import annotations

import json
import logging
import random
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from edge import DISCLAIMER, __version__
from edge.bundle import Tensor, load_bundle, new_manifest, write_manifest
from edge.classifier import Classifier
from edge.console import progress, staged_folder, stdout_to_debug_log
from edge.errors import UserError
from edge.interpreter import open_interpreter
from quantize import edgetpu
from trainer import metrics as M
from trainer.dataset import LABELS, Sample, load_arrays, scan_sources
from trainer.run_folder import Run

log = logging.getLogger(__name__)

CPU_MODEL = "model_int8.tflite"


@dataclass
class ExportOptions:
    calibration: str | None = None
    samples: int = 300
    eval_data: str | None = None
    edgetpu: bool = False
    min_agreement: float = 0.98
    max_auc_drop: float = 0.01
    accept_parity_loss: bool = False
    cv: Path | None = None
    seed: int = 0
    overwrite: bool = False  # replace a non-empty --out once the new bundle is complete
    float_twin: bool = False  # also write model_float.tflite (not part of the verified bundle)
    #: A bundle whose cell splitter the new bundle takes over (``quantize.splitter.carry_splitter``); None: none.
    splitter_from: Path | None = None


def stratified_subset(samples: Sequence[Sample], count: int, seed: int) -> list[Sample]:
    """Up to ``count`` samples taken round-robin over (class, patient), so no one patient dominates calibration."""
    groups: dict[tuple[int, str], list[Sample]] = defaultdict(list)
    for sample in samples:
        groups[(sample.label, sample.patient)].append(sample)
    rng = random.Random(seed)
    for members in groups.values():
        rng.shuffle(members)
    by_class = {label: sorted(k for k in groups if k[0] == label) for label in range(len(LABELS))}
    chosen: list[Sample] = []
    depth = 0
    while len(chosen) < min(count, len(samples)):
        for label in range(len(LABELS)):  # alternate classes, then patients within a class
            for key in by_class[label]:
                if depth < len(groups[key]) and len(chosen) < count:
                    chosen.append(groups[key][depth])
        depth += 1
    return chosen


def batch_one(model, size: int):
    """The same layers and weights behind a static batch-1 input: the Edge TPU needs static
    shapes, and the CPU interpreter can still resize the batch."""
    import keras

    crop = keras.Input((size, size, 3), batch_size=1, name="crop")
    return keras.Model(crop, model(crop, training=False), name=f"{model.name}_b1")


def convert_int8(model, size: int, calibration: np.ndarray) -> bytes:
    """Full-integer quantization: int8 inside, uint8 image in, uint8 probability out, batch 1."""
    return convert_uint8_io(batch_one(model, size), calibration, "int8", unit="crop")


def convert_uint8_io(model, calibration: np.ndarray, kind: str, unit: str) -> bytes:
    """Full-integer int8 TFLite of a Keras ``model`` that takes raw image bytes: uint8 in, uint8 out,
    calibrated on ``calibration`` (N images, one at a time)."""
    import tensorflow as tf

    # The device hands the model raw bytes (0..255). C-NMC crops are stain-normalised and rarely
    # reach 255, so one calibration image gets a 255 and a 0 pixel: the uint8 input then spans the
    # whole byte range instead of clipping brighter cells from another microscope.
    anchored = calibration.copy()
    anchored[0].flat[0], anchored[0].flat[1] = 255, 0

    def representative():
        for image in progress(anchored, desc="calibrate", unit=unit):
            yield [image[None].astype(np.float32)]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.uint8
    converter.inference_output_type = tf.uint8
    return _convert(converter, kind)


def convert_float(model, size: int) -> bytes:
    """The float32 TFLite twin (benchmarks compare against it)."""
    import tensorflow as tf

    return _convert(tf.lite.TFLiteConverter.from_keras_model(batch_one(model, size)), "float")


def _convert(converter, kind: str) -> bytes:
    """Run the converter with its chatter (a ``TensorSpec`` dump per signature, some 70 lines) kept
    for ``-v``: the lines that matter to a person come after it and would be lost in it."""
    try:
        with stdout_to_debug_log(f"TFLite converter ({kind})"), warnings.catch_warnings():
            # The uint8 input is calibrated from the representative crops; no input statistics are needed.
            warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected")
            return converter.convert()
    except Exception as error:  # the converter raises ConverterError and friends
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"{kind} conversion failed: {first}") from None


def _tensor_record(detail: dict) -> Tensor:
    scale, zero_point = detail["quantization"]
    return Tensor(dtype=np.dtype(detail["dtype"]).name, shape=[int(d) for d in detail["shape"]],
                  quantization={"scale": float(scale), "zero_point": int(zero_point)})


def parity(float_scores: np.ndarray, int8_scores: np.ndarray, labels: np.ndarray, threshold: float,
           patients: Sequence[str]) -> dict:
    float_metrics = M.compute(labels, float_scores, threshold, patients)
    int8_metrics = M.compute(labels, int8_scores, threshold, patients)
    for m in (float_metrics, int8_metrics):
        m.pop("per_patient_accuracy")
    auc_drop = None
    if float_metrics["roc_auc"] is not None:
        auc_drop = float(float_metrics["roc_auc"] - int8_metrics["roc_auc"])
    return {
        "images": int(len(labels)),
        "decision_agreement": float(np.mean((float_scores >= threshold) == (int8_scores >= threshold))),
        "max_abs_score_difference": float(np.max(np.abs(float_scores - int8_scores))),
        "auc_drop": auc_drop,
        "float": float_metrics,
        "int8": int8_metrics,
    }


def export(run: Path, out: Path, options: ExportOptions) -> dict:
    """Quantize ``run`` into a bundle at ``out``, which appears only once the bundle is complete and verifies."""
    source = Run.read(run)
    if options.cv and not (options.cv / "cv.json").is_file():
        raise UserError(f"--cv {options.cv} holds no cv.json; pass a folder written by `trainer cv`")
    from quantize.splitter import splitter_to_carry

    # Checked before the conversion's minutes, not after them. ``out`` may itself be that bundle: it is
    # replaced only once the new one is complete.
    splitter = splitter_to_carry(options.splitter_from) if options.splitter_from is not None else None
    with staged_folder(out, options.overwrite) as staging:
        return _export(source, staging, options, splitter)


def _export(source: Run, staging: Path, options: ExportOptions, splitter: dict | None = None) -> dict:
    """Write the bundle into ``staging`` (renamed into place by the caller); returns its manifest."""
    import keras

    from trainer import pipeline
    from trainer.fit import fingerprint

    run, meta, config, contract = source.folder, source.model, source.config, source.model.contract
    size = meta.input_size
    train_samples = scan_sources([options.calibration])[0] if options.calibration else source.split.samples("train", run)
    eval_samples = (scan_sources([options.eval_data], require_both=False)[0] if options.eval_data
                    else source.split.samples("validation", run))
    calibration, calibration_samples = load_arrays(stratified_subset(train_samples, options.samples, options.seed), contract)
    eval_images, eval_samples = load_arrays(eval_samples, contract)
    model = keras.models.load_model(run / meta.model_file)

    (staging / CPU_MODEL).write_bytes(convert_int8(model, size, calibration))
    interpreter = open_interpreter(str(staging / CPU_MODEL), num_threads=2, plain_ops=True)
    verdict = edgetpu.check(interpreter)
    models = {"cpu": CPU_MODEL}
    compile_record = {"compiled": False, "reason": "not requested (--edgetpu)"}
    if options.edgetpu:
        compile_record = edgetpu.compile_model(staging / CPU_MODEL, staging)
        if compile_record["compiled"]:
            models["edgetpu"] = compile_record["file"]
        else:
            log.warning("%s", compile_record["reason"])
        if not verdict["compatible"]:
            log.warning("Edge TPU: %s", "; ".join(verdict["problems"]))
    manifest = new_manifest(
        input_tensor=_tensor_record(interpreter.get_input_details()[0]),
        output_tensor=_tensor_record(interpreter.get_output_details()[0]),
        contract=contract, threshold=meta.threshold, threshold_rule=source.threshold_rule,
        models=models, edgetpu={**verdict, **compile_record},
        provenance={
            "source_run": str(run.resolve()),
            "model_kind": meta.kind,
            "training_data_fingerprint": config.get("data_fingerprint"),
            "calibration": {"images": len(calibration_samples), "patients": len({s.patient for s in calibration_samples}),
                            "source": str(options.calibration) if options.calibration else "run training split",
                            "fingerprint": fingerprint(calibration_samples)},
            "versions": {**config.get("versions", {}), "exported_with": __version__},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    )
    write_manifest(staging, manifest)

    labels = np.array([s.label for s in eval_samples])
    float_scores = pipeline.predict(model, eval_images)
    int8_scores = Classifier(staging, num_threads=2).scores(eval_images)
    result = parity(float_scores, int8_scores, labels, meta.threshold, [s.patient for s in eval_samples])
    result["eval_source"] = str(options.eval_data) if options.eval_data else "run validation split (patients unseen in training)"
    result["limits"] = {"min_agreement": options.min_agreement, "max_auc_drop": options.max_auc_drop}
    failures = []
    if result["decision_agreement"] < options.min_agreement:
        failures.append(f"decision agreement {result['decision_agreement']:.4f} < {options.min_agreement}")
    if result["auc_drop"] is not None and result["auc_drop"] > options.max_auc_drop:
        failures.append(f"AUC drop {result['auc_drop']:.4f} > {options.max_auc_drop}")
    result["passed"] = not failures
    if failures and not options.accept_parity_loss:
        raise UserError(f"int8 parity too low ({'; '.join(failures)}); calibrate with more --samples, "
                        "or pass --accept-parity-loss to export anyway")
    manifest["metrics"] = {"parity": result}
    write_manifest(staging, manifest)
    # A few validation crops and the int8 scores they got here: a device sent this bundle by
    # `quantize publish` scores them again and refuses to switch if its runtime disagrees.
    from quantize.publish import add_self_test

    manifest = add_self_test(staging, eval_images, int8_scores, meta.threshold)
    cv = json.loads((options.cv / "cv.json").read_text()) if options.cv else None
    if cv is not None:  # how long each fold trained, beside the bundle's own model: a shorter fold is a conservative estimate
        folds = [json.loads(p.read_text()) for p in sorted(options.cv.glob("fold_*/metrics.json"))]
        cv["training"] = {"folds": [(f.get("epochs_run"), f.get("train_seconds")) for f in folds],
                          "bundle": (source.metrics.get("epochs_run"), source.metrics.get("train_seconds"))}
    (staging / "MODEL_CARD.md").write_text(model_card(manifest, config, meta.kind, source.metrics, cv))
    if splitter is not None:
        from quantize.splitter import carry_splitter

        manifest = carry_splitter(options.splitter_from, splitter, staging, manifest)
    load_bundle(staging)  # what we hand over must verify
    if options.float_twin:
        (staging / "model_float.tflite").write_bytes(convert_float(model, size))
    return manifest


def _where_it_holds(run_metrics: dict) -> str:
    """The run's cross-lab and per-type numbers, as the model card states them."""
    rows = [f"| {name} | {g['cells']} | {g['called_all']:.1%} |" for name, g in run_metrics.get("validation_by_group", {}).items()]
    if "bccd" in run_metrics:
        b = run_metrics["bccd"]
        rows.append(f"| BCCD white cells (healthy, a lab never trained on) | {b['white_cells_found']} | {b['false_blast_rate']:.1%} |")
    inv = run_metrics.get("invariance")
    lines = ["| cells (validation: patients and images never trained on) | cells | called ALL |", "| --- | --- | --- |", *rows]
    for key, title in (("validation_cnmc", "C-NMC validation cells alone (ALL blasts vs normal B-cells), cut on black"),
                       ("validation_cnmc_on_smear", "the same cells put on a smear and cut by the device's smear path")):
        if key in run_metrics:
            lines += ["", f"{title}: {M.summary_line(run_metrics[key])} ({run_metrics[key]['images']} cells)."]
    if inv:
        lines += ["", f"Same decision when the cells are resampled to 0.7x / 1.4x pixel scale with the matching µm per pixel: "
                      f"{inv['scale_0.7x']:.1%} / {inv['scale_1.4x']:.1%}; under a stain and white-balance shift: {inv['stain_shift']:.1%}."]
    return "\n".join(lines)


def _cv_section(cv: dict | None) -> str:
    if not cv:
        return "No cross-validation was given to the export (`quantize export --cv DIR`)."
    rows = [f"| {key} | {v['mean']:.3f} +- {v['std']:.3f} | {v['min']:.3f}-{v['max']:.3f} |" for key, v in cv["summary"].items()]
    bccd = cv.get("bccd_false_blast_rate_per_fold")
    tail = ["", "BCCD white cells called ALL by each fold's model (a lab never trained on): "
                + ", ".join(f"{r:.1%}" for r in bccd) + "."] if bccd else []
    training = cv.get("training", {})
    folds = [f for f in training.get("folds", []) if None not in f]
    if folds and None not in training.get("bundle", (None,)):
        epochs, seconds = zip(*folds)
        tail += ["", f"Each fold's model trained {min(epochs)}-{max(epochs)} epochs ({min(seconds) / 60:.0f}-{max(seconds) / 60:.0f} min); "
                     f"this bundle's model {training['bundle'][0]} epochs ({training['bundle'][1] / 60:.0f} min)"
                     + (": the folds trained less, so read their numbers as a conservative estimate." if max(seconds) < training["bundle"][1] else ".")]
    return "\n".join([f"Grouped {cv['folds']}-fold cross-validation, whole patients left out, C-NMC cells of the left-out "
                      "patients (`trainer cv`, the same data and recipe):", "", "| metric | mean +- sd | range |", "| --- | --- | --- |", *rows,
                      *tail])


def model_card(manifest: dict, config: dict, kind: str, run_metrics: dict | None = None, cv: dict | None = None) -> str:
    p = manifest["metrics"]["parity"]
    rows = "\n".join(f"| {name} | {M.table_cells(m)} |" for name, m in (("float", p["float"]), ("int8", p["int8"])))
    data = config.get("data_summary", {})
    tpu = manifest["edgetpu"]
    contract = manifest["preprocessing"]["params"]
    sources = "; ".join(f"{name}: {json.dumps(info.get('by_type', {}))} at {info['um_per_px']} µm/px"
                        for name, info in data.get("by_source", {}).items())
    return f"""# Model card: leukoscope `{kind}` cell classifier (int8)

> {DISCLAIMER}

## What it does
Given one segmented white cell, it gives P(ALL): the probability that the cell is an acute lymphoblastic
leukaemia blast rather than any other white cell. The cell is cut out by the device's segmentation, placed on
black at {contract['um_per_px']} µm per pixel ({contract['size']}x{contract['size']} RGB, a {contract['size'] * contract['um_per_px']:.0f} µm field),
its colour mapped to a reference (preprocessing `{manifest['preprocessing']['name']}`). The device must know its
own scale (`edge calibrate`). Decision threshold {manifest['threshold']:.3f} ({manifest.get('threshold_rule', 'chosen on validation')}).

## Intended use and limits
- Research and screening support on stained blood or bone-marrow smears, with a person reviewing every flagged sample.
- Blasts seen in training are C-NMC's B-lineage ALL blasts from one lab; normal cells are C-NMC's normal B-cells and
  PBC's lymphocytes, monocytes, granulocytes and erythroblasts from a second lab. It has never seen: myeloid
  (AML) blasts, T-ALL, reactive or atypical lymphocytes, plasma cells, blasts from any other lab or stain, or smears
  from a leukaemic patient's peripheral blood. Its output on these means nothing until measured.
- Staining, optics and camera differ between labs: validate on your own slides before relying on it.

## Training data
C-NMC 2019 (Gupta A., Gupta R., "ALL Challenge dataset of ISBI 2019", The Cancer Imaging Archive, 2019,
doi:10.7937/tcia.2019.dc64i46r, CC BY 3.0) and PBC (Acevedo A. et al., Data in Brief 30 (2020) 105474, CC BY 4.0).
This model saw {json.dumps(data.get('by_label', {}))} images; per source: {sources}.
Split by patient: no C-NMC patient's cells are on both the training and the validation side.

## Measured (int8 and its float source, {p['images']} cells of {p['eval_source']})
| model | weighted F1 | accuracy | sensitivity (ALL) | specificity | ROC AUC |
| --- | --- | --- | --- | --- | --- |
{rows}

Float-vs-int8 decision agreement {p['decision_agreement']:.4f}; AUC drop {M.fmt(p['auc_drop'])}. Parity limits
(agreement >= {p['limits']['min_agreement']}, AUC drop <= {p['limits']['max_auc_drop']}): {"met" if p["passed"] else
"NOT met; exported with --accept-parity-loss (decisions that flip are those of cells scored close to the threshold)"}.

## Where it holds (float model, from the training run)
{_where_it_holds(run_metrics or {})}

## New patients
{_cv_section(cv)}

These numbers come from patient-disjoint splits of one lab's patients and one never-seen lab of healthy blood.
They are not a clinical performance claim.

## Edge TPU
Compatible by the compiler's rules: {tpu['compatible']}. Compiled: {tpu.get('compiled')} ({tpu.get('reason') or tpu.get('file')}).
"""
