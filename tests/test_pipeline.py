"""The edge pipeline end to end: real frames, the real LiteRT interpreter, `edge replay`."""

import json
import shutil

import jsonschema
import numpy as np
import pytest

from edge.classifier import Classifier
from edge.cli import DEFAULT_BUNDLE, main
from edge.pipeline import Pipeline
from edge.calibration import SCALE_FILE
from trainer.dataset import CNMC_UM_PER_PX, cell_input
from edge.preprocessing import read_rgb
from edge.segmentation import SegmentationSettings, find_cells
from edge.results import SampleTally, wilson_interval
from edge.sources import Frame
from tests.conftest import BCCD, CNMC, ROOT, needs_cnmc

SCHEMAS = ROOT / "edge" / "schemas"
FRAME_SCHEMA = json.loads((SCHEMAS / "frame-result.schema.json").read_text())
SAMPLE_SCHEMA = json.loads((SCHEMAS / "sample-summary.schema.json").read_text())


@pytest.fixture
def frames(tmp_path):
    """A few real frames where ../shared exists (BCCD smears and a C-NMC crop), plus a corrupt file."""
    folder = tmp_path / "frames"
    folder.mkdir()
    if BCCD.is_dir():
        for name in ("BloodImage_00000.jpg", "BloodImage_00003.jpg", "BloodImage_00010.jpg"):
            shutil.copy(BCCD / "JPEGImages" / name, folder / name)
    if CNMC.is_dir():
        shutil.copy(sorted((CNMC / "all").glob("*.png"))[0], folder / "cnmc_cell.png")
    if not any(folder.iterdir()):
        for path in (ROOT / "samples" / "frames").glob("*.jpg"):
            shutil.copy(path, folder / path.name)
    (folder / "zz_corrupt.png").write_bytes(b"\x89PNG broken")
    # One scale for the folder, as `edge calibrate --write` leaves it (BCCD's; the C-NMC cell is then
    # seen ~1.5x too large, which changes its score, not the mechanics tested here).
    (folder / SCALE_FILE).write_text('{"um_per_px": 0.083}')
    return folder


@pytest.mark.slow  # the tiny bundle: trains and converts a model
def test_replay_json_lines_end_to_end(tiny_bundle, frames, tmp_path, capsys):
    annotate = tmp_path / "review"
    assert main(["replay", "--bundle", str(tiny_bundle), "--source", str(frames), "--json", "--annotate", str(annotate)]) == 0
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    *results, summary = lines
    readable = sorted(p.name for p in frames.iterdir() if p.name not in ("zz_corrupt.png", SCALE_FILE))
    assert [r["source"] for r in results] == readable
    assert [r["sequence"] for r in results] == list(range(1, len(readable) + 1))  # no outbox: numbered per replay
    for result in results:
        jsonschema.validate(result, FRAME_SCHEMA)
        assert result["counts"]["cells"] == len(result["cells"])
    jsonschema.validate(summary, SAMPLE_SCHEMA)
    assert summary["frames"] == len(readable) and summary["unreadable_frames"] == 1
    assert summary["cells"] == sum(r["counts"]["cells"] for r in results) >= 1
    assert "skipped zz_corrupt.png" in captured.err and "Traceback" not in captured.err
    assert len(list(annotate.glob("*.jpg"))) == len(readable)


@pytest.mark.slow  # the tiny bundle: trains and converts a model
def test_replay_table_and_tally(tiny_bundle, frames, capsys):
    assert main(["replay", "--bundle", str(tiny_bundle), "--source", str(frames)]) == 0
    out = capsys.readouterr().out
    assert "blast fraction" in out and "not a diagnostic device" in out


@pytest.mark.slow  # the tiny bundle: trains and converts a model
@pytest.mark.parametrize("args, message", [
    (["--source", "/nonexistent"], "does not exist"),
    (["--bundle", "/nonexistent"], "model bundle /nonexistent does not exist"),
])
def test_replay_bad_input_is_one_line(tiny_bundle, frames, args, message, capsys):
    base = {"--bundle": str(tiny_bundle), "--source": str(frames)}
    base.update(dict(zip(args[::2], args[1::2])))
    assert main(["replay", *[x for pair in base.items() for x in pair]]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_annotated_frames_say_what_a_lab_calls_the_cells(tmp_path, monkeypatch):
    import cv2

    from edge.pipeline import ReviewWriter

    texts = []
    monkeypatch.setattr(cv2, "putText", lambda canvas, text, *args: texts.append(text))
    result = {"sequence": 1, "source": "f.jpg", "unclassified": [],
              "cells": [{"bbox": [2, 2, 10, 10], "label": "all", "p_all": 0.91},
                        {"bbox": [20, 20, 10, 10], "label": "hem", "p_all": 0.1}]}
    ReviewWriter(tmp_path, "all").write(np.zeros((40, 40, 3), np.uint8), result, np.zeros((2, 8, 8, 3), np.uint8))
    assert texts == ["ALL blast 0.91", "normal 0.10"]


@pytest.mark.slow  # the tiny bundle: trains and converts a model
def test_replay_of_a_folder_with_no_readable_frame_fails(tiny_bundle, tmp_path, capsys):
    for name in ("a.png", "b.jpg"):
        (tmp_path / name).write_bytes(b"not an image")
    (tmp_path / SCALE_FILE).write_text('{"um_per_px": 0.083}')
    assert main(["replay", "--bundle", str(tiny_bundle), "--source", str(tmp_path), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # no summary of a sample that was never seen
    assert captured.err.splitlines()[-1].startswith(f"edge: error: {tmp_path}: none of its 2 image file(s) could be read")


def test_replay_says_when_frames_are_dark_or_show_no_colour(tmp_path, capsys):
    """Frames from a monochrome camera, or taken with the lamp off, yield no cells: the replay says how many
    and what to check, once each, after its table (the agent's frame watch, on a folder)."""
    import cv2

    smears = sorted((ROOT / "samples" / "frames").glob("*.jpg"))[:3]
    for i, path in enumerate(smears[:2]):
        cv2.imwrite(str(tmp_path / f"grey_{i}.png"), cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2GRAY))
    shutil.copy(smears[2], tmp_path / smears[2].name)
    cv2.imwrite(str(tmp_path / "lamp_off.png"), cv2.imread(str(smears[2])) // 40)
    shutil.copy(ROOT / "samples" / "frames" / SCALE_FILE, tmp_path / SCALE_FILE)
    assert main(["replay", "--source", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    lines = {line.split(";")[0] for line in captured.err.splitlines() if line.startswith("edge: ")}
    assert lines == {"edge: 1 of 4 frames are dark: no cells are found in them",
                     "edge: 2 of 4 frames show no colour: no cells are found in them"}, captured.err
    cells = {line.split()[0]: int(line.split()[1]) for line in captured.out.splitlines()[1:5]}
    assert cells["grey_0.png"] == cells["grey_1.png"] == cells["lamp_off.png"] == 0  # listed, with no cells
    assert cells[smears[2].name] > 0
    assert main(["replay", "--source", str(tmp_path), "--json"]) == 0  # the results and the summary say it too
    *results, summary = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for body in results:
        jsonschema.validate(body, FRAME_SCHEMA)
    jsonschema.validate(summary, SAMPLE_SCHEMA)
    assert {r["source"]: r["light"]["problem"] for r in results} == \
        {smears[2].name: None, "grey_0.png": "no_colour", "grey_1.png": "no_colour", "lamp_off.png": "dark"}
    assert summary["frame_problems"] == {"no_colour": 2, "dark": 1}


@pytest.mark.parametrize("bits, suffix", [(10, ".png"), (12, ".tif"), (14, ".tif"), (16, ".png")])
def test_deeper_frames_are_read_at_their_own_bit_depth(tmp_path, bits, suffix):
    """A microscope camera's 10-14-bit frames, saved in 16-bit TIFF or PNG, read as the same picture as its 8-bit one
    (a bundled BCCD frame), and show the same cells. Read by the container's 16 bits, 12-bit data came out 16 times
    too dark: the frame was reported "dark" and no cell was found."""
    import cv2

    from edge.gate import look_at

    source = ROOT / "samples" / "frames" / "bccd_BloodImage_00000.jpg"
    eight = read_rgb(source)
    deeper = tmp_path / f"frame{suffix}"
    full = 2 ** bits - 1
    cv2.imwrite(str(deeper), np.round(cv2.cvtColor(eight, cv2.COLOR_RGB2BGR).astype(np.float64) * full / 255).astype(np.uint16))
    read = read_rgb(deeper)
    assert read.dtype == np.uint8 and np.abs(read.astype(int) - eight.astype(int)).max() <= 1
    assert look_at(read).problem is None
    settings = SegmentationSettings(um_per_px=0.083)
    assert [c.bbox for c in find_cells(read, settings)] == [c.bbox for c in find_cells(eight, settings)]


def test_the_schemas_allow_the_frame_problems_the_gate_knows_and_no_other():
    from edge.gate import FRAME_PROBLEMS

    assert FRAME_SCHEMA["properties"]["light"]["properties"]["problem"]["enum"] == [None, *FRAME_PROBLEMS]
    assert SAMPLE_SCHEMA["properties"]["frame_problems"]["propertyNames"]["enum"] == [*FRAME_PROBLEMS]


def test_replay_warns_when_a_folder_mixes_frame_sizes(tmp_path, capsys):
    """Frames of two cameras or objectives in one folder: one scale sizes them all, so the replay says so
    (the trainer's rule for a source, ``mixed_sizes``); frames of one size get no such line."""
    import cv2

    smear = sorted((ROOT / "samples" / "frames").glob("bccd_*.jpg"))[0]
    shutil.copy(smear, tmp_path / "a_small.jpg")
    shutil.copy(ROOT / "samples" / "frames" / SCALE_FILE, tmp_path / SCALE_FILE)
    assert main(["replay", "--source", str(tmp_path)]) == 0
    assert "mixes frame sizes" not in capsys.readouterr().err
    cv2.imwrite(str(tmp_path / "b_large.png"), cv2.resize(cv2.imread(str(smear)), None, fx=2, fy=2))
    assert main(["replay", "--source", str(tmp_path)]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "mixes frame sizes" in line]
    assert len(warned) == 1 and "(a_small.jpg: 640 px, b_large.png: 1280 px)" in warned[0], warned


@needs_cnmc
def test_replay_of_cnmc_crops_without_a_scale_names_cnmc_s(tmp_path, capsys):
    """Cells cut onto black show no red cells to measure the scale on: the one-line refusal names the flag and
    C-NMC's reference scale, and with it each crop is one cell."""
    for path in sorted((CNMC / "all").glob("*.png"))[:2] + sorted((CNMC / "hem").glob("*.png"))[:2]:
        shutil.copy(path, tmp_path / path.name)
    assert main(["replay", "--source", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--um-per-px (C-NMC's crops, cells cut onto black: {CNMC_UM_PER_PX})" in err, err
    assert main(["replay", "--source", str(tmp_path), "--um-per-px", str(CNMC_UM_PER_PX), "--json"]) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()][:-1]
    assert [r["counts"]["cells"] for r in results] == [1, 1, 1, 1]


@needs_cnmc
def test_the_device_crops_cells_exactly_as_training_did():
    """A C-NMC file through the device pipeline and through the trainer's loader: the same model input."""
    classifier = Classifier(DEFAULT_BUNDLE)
    pipeline = Pipeline(classifier, SegmentationSettings(um_per_px=CNMC_UM_PER_PX))
    for path in sorted((CNMC / "all").glob("*.png"))[::200] + sorted((CNMC / "hem").glob("*.png"))[::100]:
        image = read_rgb(path)
        result, _, batch = pipeline.process(Frame(image=image, name=path.name))
        assert result["counts"]["cells"] == 1
        assert np.array_equal(batch[0], cell_input(image, CNMC_UM_PER_PX, classifier.contract))


@pytest.mark.slow  # the tiny bundle: trains and converts a model
def test_batched_and_one_by_one_scores_agree(tiny_bundle):
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 255, (7, 32, 32, 3), dtype=np.uint8)
    batched = Classifier(tiny_bundle, max_batch=32).scores(crops)
    single = Classifier(tiny_bundle, max_batch=1).scores(crops)
    assert np.allclose(batched, single, atol=1e-6)


def test_wilson_interval():
    low, high = wilson_interval(0, 10)
    assert low == 0 and 0.27 < high < 0.31
    low, high = wilson_interval(50, 100)
    assert 0.40 < low < 0.41 and 0.59 < high < 0.60
    assert wilson_interval(0, 0) == (0.0, 1.0)
    tally = SampleTally("s1")
    tally.add({"counts": {"cells": 4, "blasts": 1}})
    summary = tally.summary("dev")
    jsonschema.validate(summary, SAMPLE_SCHEMA)
    assert summary["blast_fraction"] == 0.25
