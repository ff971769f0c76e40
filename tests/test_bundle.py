"""The bundle contract: every way a bundle can be wrong is refused with one line naming it."""

import json
import shutil

import pytest

from edge.bundle import FORMAT_VERSION, load_bundle
from edge.classifier import Classifier
from edge.errors import BundleError

pytestmark = pytest.mark.slow


@pytest.fixture
def bundle(tiny_bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    return copy


def _edit_manifest(bundle, change):
    manifest = json.loads((bundle / "manifest.json").read_text())
    change(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def test_manifest_round_trips(tiny_bundle):
    loaded = load_bundle(tiny_bundle)
    again = json.loads((tiny_bundle / "manifest.json").read_text())
    assert loaded.manifest == again
    assert loaded.manifest["format_version"] == FORMAT_VERSION
    assert loaded.input_size == 32 and loaded.positive_label == "all" and 0 < loaded.threshold < 1
    # The shipped bundle's cell splitter is taken over by every export unless --no-splitter (test_quantize.py).
    assert set(loaded.manifest["files"]) == {"model_int8.tflite", "selftest_crops.npz", "splitter_int8.tflite"}
    assert Classifier(tiny_bundle).self_test() is None  # export records crops that score as recorded
    provenance = loaded.manifest["provenance"]
    assert {"source_run", "training_data_fingerprint", "versions", "created", "calibration"} <= set(provenance)


def _flip_a_byte(bundle):
    data = bytearray((bundle / "model_int8.tflite").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle / "model_int8.tflite").write_bytes(bytes(data))


@pytest.mark.parametrize("damage, message", [
    (_flip_a_byte, "does not match its SHA-256"),
    (lambda b: (b / "model_int8.tflite").unlink(), "is missing model_int8.tflite"),
    (lambda b: (b / "manifest.json").unlink(), "has no manifest.json"),
    (lambda b: (b / "manifest.json").write_text("{not json"), "is not valid JSON"),
    (lambda b: _edit_manifest(b, lambda m: m.update(format_version=99)), "format version 99"),
    (lambda b: _edit_manifest(b, lambda m: m.pop("threshold")), "lacks threshold"),
    (lambda b: _edit_manifest(b, lambda m: m.update(format="something-else")), "not a leukoscope model bundle"),
    (lambda b: _edit_manifest(b, lambda m: m["files"].update({"../x": "0"})), "outside the bundle"),
    (lambda b: _edit_manifest(b, lambda m: m["preprocessing"].update(name="some-other-v9")),
     "expects preprocessing 'some-other-v9'.*re-export"),
    (lambda b: _edit_manifest(b, lambda m: m["input"].update(color_order="BGR")), "expects colour order 'BGR'"),
    (lambda b: _edit_manifest(b, lambda m: m["preprocessing"]["params"].pop("um_per_px")), "must give size, um_per_px"),
    (lambda b: _edit_manifest(b, lambda m: m["preprocessing"]["params"].update(size=48)),
     "input size 32 disagrees with the preprocessing size 48"),
])
def test_damaged_bundles_are_refused(bundle, damage, message):
    damage(bundle)
    with pytest.raises(BundleError, match=message) as caught:
        load_bundle(bundle)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("change, message", [
    (lambda m: (m["input"].update(size=64), m["preprocessing"]["params"].update(size=64)),
     "input shape .* disagrees with manifest size 64x64x3"),
    (lambda m: m["input"].update(dtype="int8"), "model input is uint8 but the manifest says int8"),
    (lambda m: m["output"]["quantization"].update(zero_point=7), "output quantization .* disagrees"),
])
def test_tensors_that_disagree_with_the_manifest_are_refused(bundle, change, message):
    _edit_manifest(bundle, change)
    load_bundle(bundle)  # the files are intact...
    with pytest.raises(BundleError, match=message):
        Classifier(bundle)  # ...but the model is not what the manifest says


def test_missing_bundle_folder(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nope")


def test_edgetpu_variant_absent_is_named(tiny_bundle):
    with pytest.raises(BundleError, match="has no 'edgetpu' model"):
        load_bundle(tiny_bundle).model_path("edgetpu")
