"""The trainer end to end on a tiny real dataset: 1-2 training steps, then evaluate reads the run back."""

import json
import warnings
import shutil

import numpy as np
import pytest

from trainer.cli import main
from trainer.models import SEED_PARAMETERS, edge_model, seed_model

pytestmark = pytest.mark.slow

RUN_FILES = {"model.keras", "model.json", "config.json", "split.json", "history.csv", "metrics.json",
             "training_curves.png", "confusion_matrix.png", "roc.png", "report.md"}


def test_seed_model_is_the_published_cnn():
    assert seed_model().count_params() == SEED_PARAMETERS == 30_595_265


def test_edge_model_is_small_and_edge_tpu_friendly():
    model = edge_model(128)
    assert model.count_params() < 1_000_000  # int8: about one byte per weight, well under 1 MB
    allowed = {"InputLayer", "Rescaling", "Conv2D", "DepthwiseConv2D", "BatchNormalization", "ReLU",
               "GlobalAveragePooling2D", "Dropout", "Dense"}
    assert {type(layer).__name__ for layer in model.layers} <= allowed


def _tiny(tmp_path, tiny_data, *extra: str):
    run = tmp_path / "run"
    code = main(["fit", "--data", str(tiny_data), "--out", str(run), "--epochs", "2", "--steps-per-epoch", "1",
                 "--batch-size", "8", "--image-size", "64", "--val-fraction", "0.34", "--allow-collapse", *extra])
    assert code == 0
    return run


def test_fit_writes_a_complete_run_and_evaluate_reads_it(tmp_path, tiny_data, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text("{}")  # an older run's leftover
    (tmp_path / "run" / "stale.txt").write_text("")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = _tiny(tmp_path, tiny_data, "--overwrite")
    assert not [w for w in caught if "shuffle" in str(w.message)]
    out, err = capsys.readouterr()
    assert "/ALL blast:" in out and "/normal:" in out and "/hem:" not in out  # words a lab reads
    # Not a terminal: plain lines, no progress-bar redraws or colour codes.
    assert "\r" not in out + err and "\x1b[" not in out + err and "Epoch 2/2" in out
    assert RUN_FILES <= {p.name for p in run.iterdir()} and not (run / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "run"]  # no staging folder left beside it
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2 and metrics["input_size"] == 64
    assert 0 < metrics["threshold"] < 1
    split = json.loads((run / "split.json").read_text())
    assert not set(split["train"]["patients"]) & set(split["validation"]["patients"])
    capsys.readouterr()

    assert main(["evaluate", str(run), "--data", str(tiny_data), "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["images"] == 40
    assert "not new-patient numbers" in captured.err and result["seen_in_training"]["cells"] > 0
    assert set(result) >= {"accuracy", "weighted_f1", "sensitivity_all", "specificity_all", "roc_auc", "per_patient_accuracy"}
    assert len(result["per_patient_accuracy"]) == 8

    # Only the validation patients' cells: numbers on patients it never trained on, said without "test".
    unseen = tmp_path / "unseen"
    for record in split["validation"]["samples"]:
        (unseen / record["cell_type"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(record["path"], unseen / record["cell_type"])
    assert main(["evaluate", str(run), "--data", str(unseen)]) == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err and "test" not in captured.out
    assert captured.out.startswith(f"{len(split['validation']['samples'])} cells: weighted F1")


def test_a_collapsed_model_fails_the_run_loudly(tmp_path, tiny_data, capsys):
    # Every cell the same image, of both classes: whatever one step learns, it gives every cell the
    # same score, so the run must collapse (no luck involved), and say so without a traceback.
    images = sorted(tiny_data.rglob("*.png"))
    same = images[0].read_bytes()
    for path in images:
        path.write_bytes(same)
    code = main(["fit", "--data", str(tiny_data), "--out", str(tmp_path / "run"), "--epochs", "1", "--steps-per-epoch", "1",
                 "--batch-size", "8", "--image-size", "64", "--val-fraction", "0.34"])
    err = capsys.readouterr().err
    assert code == 2 and "model collapsed on validation" in err and "Traceback" not in err, err[-2000:]
    assert not (tmp_path / "run").exists()  # nothing that looks like a run


@pytest.mark.parametrize("args, message", [
    (["fit", "--data", "/nonexistent", "--out", "x"], "data folder /nonexistent does not exist"),
    (["fit", "--data", ".", "--out", "x", "--epochs", "0"], "--epochs must be at least 1"),
    (["cv", "--data", ".", "--out", "x", "--max-type-false-blast", "0"], "--max-type-false-blast must be above 0"),
    (["fit", "--data", ".", "--out", "x", "--patient-power", "2"], "--patient-power must be between 0"),
    (["fit", "--data", ".", "--out", "x", "--weight-average", "1"], "--weight-average must be 0 (off) or a momentum below 1"),
    (["evaluate", "/nonexistent", "--data", "."], "is not a complete training run"),
])
def test_bad_input_gives_one_line(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("command", ["fit", "cv"])
def test_a_non_empty_out_is_refused_before_any_work(command, tmp_path, tiny_data, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text("{}")
    assert main([command, "--data", str(tiny_data), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "exists and is not empty" in err and "--overwrite" in err and len(err.splitlines()) == 1
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["metrics.json"]


def test_cv_runs_chosen_folds_of_the_same_split(tmp_path, tiny_data, capsys):
    from trainer.dataset import scan_sources
    from trainer.split import grouped_folds

    out = tmp_path / "cv"
    assert main(["cv", "--data", str(tiny_data), "--out", str(out), "--folds", "2", "--only-fold", "1", "--epochs", "1",
                 "--steps-per-epoch", "1", "--batch-size", "8", "--image-size", "32", "--val-fraction", "0.34",
                 "--allow-collapse", "--compose-share", "0"]) == 0
    assert "roc_auc" in capsys.readouterr().out
    summary = json.loads((out / "cv.json").read_text())
    assert summary["folds"] == 2 and summary["folds_run"] == [1] and len(summary["per_fold"]) == 1
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["fold_1"]
    assert "Folds run: 1 of 2" in (out / "cv_report.md").read_text()
    # Fold 1 is the full run's fold 1: the same patients left out.
    samples, _ = scan_sources([str(tiny_data)])
    expected = {samples[i].patient for i in grouped_folds(samples, folds=2, val_fraction=0.34, seed=0)[1].test}
    assert set(json.loads((out / "fold_1" / "split.json").read_text())["test"]["patients"]) == expected
    assert main(["cv", "--data", str(tiny_data), "--out", str(tmp_path / "x"), "--folds", "2", "--only-fold", "2"]) == 2
    assert "--only-fold must be between 0 and 1" in capsys.readouterr().err


def test_an_interrupted_run_leaves_nothing_that_looks_like_a_run(tmp_path, tiny_data, capsys, monkeypatch):
    from trainer import plots

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C after the model, history and split are written, before the report

    monkeypatch.setattr(plots, "training_curves", interrupt)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "old.txt").write_text("the previous run")
    code = main(["fit", "--data", str(tiny_data), "--out", str(tmp_path / "run"), "--overwrite", "--epochs", "1",
                 "--steps-per-epoch", "1", "--batch-size", "8", "--image-size", "32", "--val-fraction", "0.34",
                 "--allow-collapse"])
    assert code == 130 and "interrupted" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "run"]  # no partial folder beside it
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["old.txt"]  # the old run untouched


def test_corrupt_model_file_is_named(tmp_path, tiny_data, capsys):
    run = _tiny(tmp_path, tiny_data)
    (run / "model.keras").write_bytes(b"garbage")
    capsys.readouterr()
    assert main(["evaluate", str(run), "--data", str(tiny_data)]) == 2
    assert "model.keras cannot be loaded" in capsys.readouterr().err


def test_weight_average_keeps_the_averaged_weights(tmp_path, tiny_data):
    """With a momentum near 1 the average stays where the first step put it (Keras starts it there), while the
    last step's weights move on: the run must keep (and validate) the average, not the last step."""
    import keras

    from trainer.models import build

    keras.utils.set_random_seed(0)
    initial = build("edge", 64)[0].trainable_weights
    moved = {}
    for name, extra in (("plain", ()), ("averaged", ("--weight-average", "0.999999"))):
        (tmp_path / name).mkdir()
        run = _tiny(tmp_path / name, tiny_data, "--epochs", "1", "--steps-per-epoch", "4", *extra)
        saved = keras.models.load_model(run / "model.keras").trainable_weights
        moved[name] = max(float(np.abs(a.numpy() - b.numpy()).max()) for a, b in zip(initial, saved))
    assert moved["plain"] > 1.5 * moved["averaged"] > 0, moved
    assert json.loads((tmp_path / "averaged" / "run" / "config.json").read_text())["weight_average"] == 0.999999


def test_batch_norm_statistics_are_measured_afresh_before_validation():
    """The running mean over the given batches, every batch alike; the layers' own momentum is kept."""
    import keras
    import tensorflow as tf

    from trainer.models import BatchNormRecalibration

    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(3, name="hidden")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.BatchNormalization(momentum=0.9, name="bn")(hidden)))
    rng = np.random.default_rng(0)
    data = [rng.normal(2.0, 3.0, (8, 4)).astype(np.float32) for _ in range(5)]
    batches = tf.data.Dataset.from_tensor_slices((np.concatenate(data), np.zeros(40, np.float32))).batch(8)
    norm = model.get_layer("bn")
    norm.moving_mean.assign(np.full(3, 99.0, np.float32))
    callback = BatchNormRecalibration(batches, count=4)
    callback.set_model(model)
    callback.on_test_begin()
    seen = np.concatenate([keras.Model(inputs, model.get_layer("hidden").output)(x).numpy() for x in data[:4]])
    assert np.allclose(norm.moving_mean.numpy(), seen.mean(axis=0), atol=1e-4)
    assert np.allclose(norm.moving_variance.numpy(), np.mean([seen[k:k + 8].var(axis=0) for k in range(0, 32, 8)], axis=0), rtol=1e-3)
    assert norm.momentum == 0.9
