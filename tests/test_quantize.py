"""quantize export / inspect / evaluate on a tiny trained run, with the real LiteRT interpreter."""

import json

import numpy as np
import pytest

from edge.bundle import load_bundle
from edge.classifier import Classifier
from edge.bundle import load_bundle as _load
from trainer.dataset import Sample, load_arrays
from edge.interpreter import open_interpreter
from quantize import edgetpu
from quantize.cli import main

pytestmark = pytest.mark.slow


def test_export_is_all_int8_and_matches_the_float_model_within_recorded_parity(tiny_run, tiny_bundle):
    import keras

    from trainer import pipeline

    interpreter = open_interpreter(str(tiny_bundle / "model_int8.tflite"), plain_ops=True)
    assert interpreter.get_input_details()[0]["dtype"] == np.uint8
    assert interpreter.get_output_details()[0]["dtype"] == np.uint8
    float_tensors = [t["name"] for t in interpreter.get_tensor_details()
                     if t["dtype"] == np.float32 and t["quantization"] == (0.0, 0) and t["shape"].size]
    # Every activation and weight is 8-bit (int32 biases aside); no float op anywhere.
    assert all(np.dtype(t["dtype"]) in (np.int8, np.uint8, np.int32) for t in interpreter.get_tensor_details()), float_tensors
    assert "DEQUANTIZE" not in {op["op_name"] for op in interpreter._get_ops_details()}

    manifest = load_bundle(tiny_bundle).manifest
    recorded = manifest["metrics"]["parity"]
    split = json.loads((tiny_run[1] / "split.json").read_text())
    samples = [Sample.from_record(r) for r in split["validation"]["samples"]]
    images, _ = load_arrays(samples, _load(tiny_bundle).contract, progress=False)
    float_scores = pipeline.predict(keras.models.load_model(tiny_run[1] / "model.keras"), images)
    int8_scores = Classifier(tiny_bundle).scores(images)
    threshold = manifest["threshold"]
    agreement = float(np.mean((float_scores >= threshold) == (int8_scores >= threshold)))
    assert agreement == pytest.approx(recorded["decision_agreement"])
    assert np.max(np.abs(float_scores - int8_scores)) == pytest.approx(recorded["max_abs_score_difference"], abs=1e-6)
    assert np.max(np.abs(float_scores - int8_scores)) < 0.1  # int8 tracks float even on a barely trained model


def test_parity_below_limits_refuses_the_export(tiny_run, tmp_path, capsys):
    out = tmp_path / "bundle"
    code = main(["export", str(tiny_run[1]), "--out", str(out), "--samples", "8", "--min-agreement", "1.01"])
    assert code == 2
    assert "int8 parity too low" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing half-written is left behind, not even a staging folder


def test_a_non_empty_out_is_refused_unless_overwrite(tiny_run, tmp_path, capfd):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "stale.txt").write_text("")
    assert main(["export", str(tiny_run[1]), "--out", str(out), "--samples", "8"]) == 2
    err = capfd.readouterr().err.strip()
    assert "exists and is not empty" in err and "--overwrite" in err and len(err.splitlines()) == 1
    assert main(["export", str(tiny_run[1]), "--out", str(out), "--samples", "8", "--accept-parity-loss", "--overwrite"]) == 0
    captured = capfd.readouterr()
    # The four lines a person needs, not buried in the converter's TensorSpec dump or framework logs.
    assert [line.split(" ")[0] for line in captured.out.splitlines()] == ["bundle", "parity", "Edge", "splitter"]
    assert "TensorSpec" not in captured.err and "Assets written" not in captured.err and "\r" not in captured.err
    assert (out / "model_int8.tflite").is_file() and not (out / "stale.txt").exists()
    load_bundle(out)


def test_an_export_takes_over_the_shipped_splitter_and_the_device_runs_it(tiny_bundle, capsys):
    """A re-exported or site-fine-tuned classifier keeps the learned cell splitter (without it the device
    finds 0.700 of clustered cells instead of 0.960): the same bytes, its record, and a card that says so."""
    from edge.assets import DEFAULT_BUNDLE
    from edge.splitter import CellSplitter

    shipped, bundle = load_bundle(DEFAULT_BUNDLE).manifest, load_bundle(tiny_bundle)
    record = bundle.manifest["splitter"]
    assert bundle.manifest["files"][record["file"]] == shipped["files"][shipped["splitter"]["file"]]
    assert {k: v for k, v in record.items() if k != "provenance"} == {k: v for k, v in shipped["splitter"].items() if k != "provenance"}
    assert record["provenance"]["carried_from"] == str(DEFAULT_BUNDLE.resolve())
    assert record["provenance"]["source_run"] == shipped["splitter"]["provenance"]["source_run"]
    assert "## Cell splitter" in (tiny_bundle / "MODEL_CARD.md").read_text()
    splitter = Classifier(tiny_bundle).splitter
    assert isinstance(splitter, CellSplitter)
    assert splitter.distance(np.full((60, 80, 3), 235, np.uint8)).max() < 0.2  # it runs: a blank field holds no cell
    assert main(["inspect", str(tiny_bundle)]) == 0
    assert f"taken over from {DEFAULT_BUNDLE.resolve()}" in capsys.readouterr().out


def test_an_export_without_a_splitter_and_a_source_that_has_none(tiny_run, tmp_path, capfd):
    bare = tmp_path / "bare"
    assert main(["export", str(tiny_run[1]), "--out", str(bare), "--samples", "8", "--accept-parity-loss", "--no-splitter"]) == 0
    assert "splitter" not in load_bundle(bare).manifest and Classifier(bare).splitter is None
    assert "splitter none" in capfd.readouterr().out
    for source, message in ((bare, "holds no splitter"), (tmp_path / "nowhere", "does not exist")):
        assert main(["export", str(tiny_run[1]), "--out", str(tmp_path / "b"), "--splitter-from", str(source)]) == 2
        err = capfd.readouterr().err.strip()
        assert "--splitter-from" in err and message in err and len(err.splitlines()) == 1
        assert not (tmp_path / "b").exists()


def test_inspect_and_evaluate_json(tiny_run, tiny_bundle, capsys):
    assert main(["inspect", str(tiny_bundle), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["tensors"]["inputs"][0]["shape"] == [1, 32, 32, 3]
    assert info["edgetpu_check"]["compatible"] is True
    assert "CONV_2D" in info["ops"] and "DEPTHWISE_CONV_2D" in info["ops"]
    assert main(["inspect", str(tiny_bundle)]) == 0
    assert "Edge TPU: compatible" in capsys.readouterr().out

    assert main(["evaluate", str(tiny_bundle), "--data", str(tiny_run[0]), "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert "not new-patient numbers" in captured.err and result["seen_in_training"]["cells"] > 0
    assert result["images"] == 40 and 0 <= result["weighted_f1"] <= 1


def test_edgetpu_checker_flags_an_unsupported_op(tmp_path):
    import keras
    import tensorflow as tf

    inputs = keras.Input((16, 16, 3), batch_size=1)
    x = keras.layers.Conv2D(4, 3)(inputs)
    x = keras.layers.LeakyReLU(0.1)(x)  # TFLite has an int8 LEAKY_RELU; the Edge TPU does not map it
    outputs = keras.layers.Dense(1, activation="sigmoid")(keras.layers.GlobalAveragePooling2D()(x))
    converter = tf.lite.TFLiteConverter.from_keras_model(keras.Model(inputs, outputs))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([np.random.rand(1, 16, 16, 3).astype(np.float32) * 255] for _ in range(8))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = converter.inference_output_type = tf.uint8
    path = tmp_path / "leaky.tflite"
    path.write_bytes(converter.convert())
    verdict = edgetpu.check(open_interpreter(str(path), plain_ops=True))
    assert verdict["compatible"] is False
    assert verdict["first_cpu_op"].startswith("LEAKY_RELU")


def test_edgetpu_compile_is_never_claimed_without_the_compiler(tiny_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no edgetpu_compiler here
    record = edgetpu.compile_model(tiny_bundle / "model_int8.tflite", tmp_path)
    assert record["compiled"] is False and "apt-get install edgetpu-compiler" in record["reason"]


def test_export_of_an_incomplete_run_is_one_line(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not a complete training run" in err and len(err.splitlines()) == 1


def test_an_unreadable_broker_password_file_is_one_line(tmp_path, capsys):
    assert main(["revert", "--to", "pi-1", "--password-file", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--password-file" in err and "cannot be read" in err and len(err.splitlines()) == 1


def test_model_card_states_the_threshold_and_its_rule_once(tiny_bundle):
    from quantize.export import model_card
    from trainer.metrics import choose_threshold

    threshold, rule = choose_threshold(np.array([0, 0, 1]), np.array([0.1, 0.2, 0.9]))  # too few cells: the default
    manifest = {**load_bundle(tiny_bundle).manifest, "threshold": threshold, "threshold_rule": rule}
    card = model_card(manifest, {}, {"kind": "edge"})
    assert "Decision threshold 0.500 (the default for class-balanced training: validation holds only 1 cells" in card
    assert "0.500: 0.5" not in card


def test_model_card_says_how_long_the_cross_validation_folds_trained():
    """A CV of shorter-trained folds than the bundle's model must not pass for the bundle's own estimate."""
    from quantize.export import _cv_section

    summary = {"weighted_f1": {"mean": 0.84, "std": 0.12, "min": 0.65, "max": 0.97}}
    cv = {"folds": 5, "summary": summary, "training": {"folds": [(8, 776.0), (14, 648.0)], "bundle": (23, 1351.7)}}
    text = _cv_section(cv)
    assert "Each fold's model trained 8-14 epochs (11-13 min); this bundle's model 23 epochs (23 min)" in text
    assert "conservative estimate" in text
    cv["training"]["bundle"] = (10, 600.0)
    assert "conservative" not in _cv_section(cv)
    assert "trained" not in _cv_section({"folds": 5, "summary": summary})  # an older cv.json: nothing claimed


def test_selftest_records_crops_a_device_scores_again(tiny_run, tiny_bundle, tmp_path, capsys):
    """`quantize selftest` (a bundle made before self-tests, or re-recorded): it read cells through a module
    that had moved, and failed with an import error instead of recording anything."""
    import shutil

    from edge.classifier import Classifier

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    assert main(["selftest", str(bundle), "--data", str(tiny_run[0])]) == 0
    assert "self-test of" in capsys.readouterr().out
    assert Classifier(bundle).self_test() is None  # recorded, checksummed, and it scores as recorded
