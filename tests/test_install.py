"""A regular (non-editable) install, as systemd/install.sh makes one on a Pi, finds the shipped model,
the sample frames and the JSON Schemas without the checkout it was built from."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("pyproject.toml", "README.md", "edge", "trainer", "quantize", "collector", "models", "samples")


@pytest.mark.slow
def test_regular_install_finds_the_shipped_model_samples_and_schemas(tmp_path: Path) -> None:
    alone = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the checkout must not leak in
    source = tmp_path / "source"
    source.mkdir()
    for name in SHIPPED:
        item = ROOT / name
        if item.is_dir():
            shutil.copytree(item, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(item, source / name)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(source)], env=alone, check=True, capture_output=True)
    shutil.rmtree(source)  # the install must not lean on the tree it was built from

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    *map(str, wheels.glob("*.whl"))], env=alone, check=True, capture_output=True)
    # The dependencies (numpy, OpenCV, LiteRT, ...) come from the environment running the tests.
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               env=alone, check=True, capture_output=True, text=True).stdout.strip())
    (site / "test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    probe = ("import json, edge, edge.assets as a, edge.results as r; from edge.config import ClassifierConfig; "
             "print(json.dumps([edge.__file__, str(a.DEFAULT_BUNDLE), str(a.SAMPLE_FRAMES), str(ClassifierConfig().bundle)]))")
    found = json.loads(subprocess.run([str(python), "-c", probe], cwd=tmp_path, env=alone, check=True,
                                      capture_output=True, text=True).stdout)
    share = venv / "share" / "leukoscope"
    assert found == [str(site / "edge" / "__init__.py"), str(share / "models" / "default"), str(share / "samples" / "frames"),
                     str(share / "models" / "default")]
    assert {p.name for p in (site / "edge" / "schemas").iterdir()} >= {"frame-result.schema.json", "sample-summary.schema.json"}
    assert (site / "edge" / "web" / "static").is_dir() and any((site / "edge" / "web" / "static").iterdir())  # the local page

    replay = subprocess.run([str(venv / "bin" / "edge"), "replay", "--source", str(share / "samples" / "frames"), "--json"],
                            cwd=tmp_path, env=alone, capture_output=True, text=True, timeout=300)
    assert replay.returncode == 0, replay.stderr
    summary = json.loads(replay.stdout.strip().splitlines()[-1])
    assert summary["final"] and summary["frames"] == 6 and summary["cells"] > 0
