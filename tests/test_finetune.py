"""``trainer fit --finetune RUN``: a tiny run adapted to a "site" writes a normal run that ``quantize export``
accepts; a missing or incomplete run, a run of another crop contract, or too few site cells give one line."""

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import make_tiny_data
from trainer.cli import main

pytestmark = pytest.mark.slow

FINETUNE = ["--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "8", "--allow-collapse"]


def _site(tmp_path: Path) -> Path:
    """A second source in the export-reviews layout ({all,hem}/UID_<n>_...): real C-NMC crops where present."""
    return make_tiny_data(tmp_path / "site")


def test_finetune_writes_a_complete_run_that_quantize_exports(tiny_run, tmp_path, capsys):
    from quantize.cli import main as quantize_main
    from trainer.run_folder import Run

    _, base = tiny_run
    before = {p.name: p.stat().st_mtime_ns for p in base.iterdir()}
    out = tmp_path / "tuned"
    assert main(["fit", "--finetune", str(base), "--data", str(_site(tmp_path)), "--out", str(out), *FINETUNE]) == 0
    printed = capsys.readouterr().out
    assert "kept from run" in printed and f"run written to {out}" in printed
    assert {p.name: p.stat().st_mtime_ns for p in base.iterdir()} == before  # RUN untouched

    run = Run.read(out)  # the reader quantize export uses
    assert {"model.keras", "model.json", "split.json", "config.json", "metrics.json", "report.md", "history.csv",
            "training_curves.png"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["finetuned_from"]["run"] == str(base.resolve()) and len(config["finetuned_from"]["model_sha256"]) == 64
    metrics = run.metrics
    assert metrics["finetuned_from"] == str(base.resolve()) and metrics["epochs_run"] == 1
    # 40 site cells, fewer than 250 of a class: all train, and RUN's threshold is kept, saying why.
    assert metrics["site"]["cells"] == 40 and metrics["site"]["train"] == 40 and metrics["site"]["validation"] == 0
    base_threshold = json.loads((base / "model.json").read_text())["threshold"]
    assert run.model.threshold == base_threshold and "kept from run" in metrics["threshold_rule"]
    assert run.model.contract == Run.read(base).model.contract
    # The model has seen RUN's training patients and the site's: split.json says so; site patients carry their source.
    assert Run.read(base).split.patients("train") < run.split.patients("train")
    assert {p for p in run.split.patients("train") if p.startswith("site:")}
    assert "site, trained on" in (out / "report.md").read_text()

    bundle = tmp_path / "bundle"
    assert quantize_main(["export", str(out), "--out", str(bundle), "--samples", "8", "--accept-parity-loss"]) == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["provenance"]["source_run"] == str(out.resolve()) and manifest["threshold"] == base_threshold


def _one_line(capsys, args: list[str], message: str) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err, err


def test_bad_finetune_input_gives_one_line(tiny_run, tmp_path, capsys):
    _, base = tiny_run
    site = _site(tmp_path)
    out = str(tmp_path / "out")
    _one_line(capsys, ["fit", "--finetune", str(tmp_path / "nope"), "--data", str(site), "--out", out],
              "--finetune " + str(tmp_path / "nope") + " does not exist")

    incomplete = tmp_path / "incomplete"
    shutil.copytree(base, incomplete)
    (incomplete / "split.json").unlink()
    _one_line(capsys, ["fit", "--finetune", str(incomplete), "--data", str(site), "--out", out],
              "is not a complete training run (missing split.json)")

    other = tmp_path / "other-contract"
    shutil.copytree(base, other)
    record = json.loads((other / "model.json").read_text())
    record["preprocessing"]["params"]["lab_mean"] = [60.0, 150.0, 100.0]
    (other / "model.json").write_text(json.dumps(record))
    _one_line(capsys, ["fit", "--finetune", str(other), "--data", str(site), "--out", out],
              "the run's crop contract differs from the one this leukoscope cuts the site's cells with (lab_mean)")

    moved = tmp_path / "moved"
    shutil.copytree(base, moved)
    split = (moved / "split.json").read_text().replace(str(tiny_run[0].resolve()), str(tmp_path / "gone"))
    (moved / "split.json").write_text(split)
    _one_line(capsys, ["fit", "--finetune", str(moved), "--data", str(site), "--out", out],
              "training images are not here")

    few = tmp_path / "few"
    for path in sorted(site.rglob("*.png"))[:3] + sorted(site.rglob("*.bmp"))[:3]:
        target = few / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    _one_line(capsys, ["fit", "--finetune", str(base), "--data", str(few), "--out", out], "fine-tuning needs at least 10")
    _one_line(capsys, ["fit", "--finetune", str(base), "--data", str(site), "--out", out, "--image-size", "64"],
              "--image-size cannot be used with --finetune")
    assert not (tmp_path / "out").exists()


def test_a_site_with_one_class_is_fine_tuned_with_the_replay_giving_the_other(tiny_run, tmp_path, capsys):
    _, base = tiny_run
    site = _site(tmp_path)
    shutil.rmtree(site / "all")  # a healthy lab: every reviewed cell is normal
    out = tmp_path / "tuned"
    assert main(["fit", "--finetune", str(base), "--data", str(site), "--out", str(out), *FINETUNE]) == 0
    assert "holds only normal cells" in capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["site"] == {**metrics["site"], "blast": 0, "normal": 20}
    assert {s["label"] for s in json.loads((out / "split.json").read_text())["train"]["samples"]} == {0, 1}
