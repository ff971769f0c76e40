"""Shared fixtures. Tests that need the real data in ../shared skip, saying why, when it is absent."""

from __future__ import annotations

import os
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LEUKOSCOPE_SHARED_DATA", ROOT.parent / "shared" / "data"))
CNMC = SHARED_DATA / "cnmc-dev"
BCCD = SHARED_DATA / "bccd"
PBC = SHARED_DATA / "pbc-normal"

needs_cnmc = pytest.mark.skipif(not CNMC.is_dir(), reason=f"real C-NMC crops not found at {CNMC} (../shared is absent in a bare clone)")
needs_pbc = pytest.mark.skipif(not PBC.is_dir(), reason=f"real PBC cells not found at {PBC} (../shared is absent in a bare clone)")
@pytest.fixture
def broker(tmp_path: Path):
    """A private mosquitto (or amqtt where mosquitto is absent) on a free port, stopped after the test."""
    from tests.broker import Broker

    b = Broker(tmp_path / "broker").start()
    yield b
    b.stop()


def wait_for(condition: Callable[[], object], timeout: float) -> bool:
    """Wait on the event itself (polled every 50 ms) instead of a fixed sleep; False on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


needs_bccd = pytest.mark.skipif(not BCCD.is_dir(), reason=f"real BCCD frames not found at {BCCD} (../shared is absent in a bare clone)")


def cell_crop(rng: np.random.Generator, size: int = 96, blast: bool = False) -> np.ndarray:
    """A stand-in C-NMC crop (BGR): a stained cell on black, for tests of file handling only."""
    image = np.zeros((size, size, 3), np.uint8)
    radius = int(size * (0.36 if blast else 0.28))
    colour = (170, 60, 120) if blast else (150, 80, 140)
    cv2.circle(image, (size // 2, size // 2), radius, tuple(int(c + rng.integers(-20, 20)) for c in colour), -1)
    cv2.circle(image, (size // 2, size // 2), radius // 2, (120, 40, 90), -1)
    return image


def write_ours(root: Path, patients: dict[str, int], suffix: str = ".png", seed: int = 0) -> Path:
    """Our layout: root/{all,hem}/UID_<p>_<i>_1_<label>.png; patient ids starting with H are hem."""
    rng = np.random.default_rng(seed)
    for patient, count in patients.items():
        label = "hem" if patient.startswith("H") else "all"
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            cv2.imwrite(str(root / label / f"UID_{patient}_{i}_1_{label}{suffix}"), cell_crop(rng, blast=label == "all"))
    return root


def make_tiny_data(root: Path) -> Path:
    """Real C-NMC crops (4 patients and 4 donors, 5 cells each) where ../shared exists, else stand-ins."""
    if not CNMC.is_dir():
        return write_ours(root, {**{str(p): 5 for p in (1, 2, 3, 4)}, **{f"H{d}": 5 for d in (1, 2, 3, 4)}})
    for label in ("all", "hem"):
        by_patient: dict[str, list[Path]] = defaultdict(list)
        for path in sorted((CNMC / label).glob("*.png")):
            by_patient[path.name.split("_")[1]].append(path)
        target = root / label
        target.mkdir(parents=True)
        chosen = sorted(by_patient, key=lambda p: -len(by_patient[p]))[:4]
        for patient in chosen:
            for path in by_patient[patient][:5]:
                shutil.copy(path, target / path.name)
    return root


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    return make_tiny_data(tmp_path / "data")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """(data, run): a 32-px edge model trained for a few steps; complete, not useful."""
    from trainer.cli import main

    base = tmp_path_factory.mktemp("tiny_run")
    data = make_tiny_data(base / "data")
    run = base / "run"
    assert main(["fit", "--data", str(data), "--out", str(run), "--epochs", "2", "--steps-per-epoch", "3",
                 "--batch-size", "8", "--image-size", "32", "--val-fraction", "0.34", "--allow-collapse"]) == 0
    return data, run


@pytest.fixture(scope="session")
def tiny_bundle(tiny_run, tmp_path_factory) -> Path:
    """The tiny run exported as an int8 bundle (parity limits waived: the model is barely trained)."""
    from quantize.cli import main

    out = tmp_path_factory.mktemp("bundle") / "bundle"
    assert main(["export", str(tiny_run[1]), "--out", str(out), "--samples", "16", "--accept-parity-loss", "--float-twin"]) == 0
    return out


@pytest.fixture(scope="session")
def postgres_server():
    """One private PostgreSQL cluster for the session (tests/postgres.py); skipped, with the reason, where
    PostgreSQL cannot run."""
    from tests.postgres import Postgres, why_unavailable

    reason = why_unavailable()
    if reason:
        pytest.skip(reason)
    server = Postgres().start()
    yield server
    server.stop()


def through_field_stop(frame_rgb: np.ndarray, pad: int = 80, radius: float = 0.5) -> np.ndarray:
    """``frame_rgb`` as an eyepiece or phone camera sees a smear: padded by ``pad`` pixels of the frame's own glass
    colour, then black outside a circle of ``radius`` times the padded frame's shorter side, centred."""
    pixels = frame_rgb.reshape(-1, 3)
    glass = np.median(pixels[pixels.max(axis=1) >= np.percentile(pixels.max(axis=1), 80)], axis=0)
    padded = cv2.copyMakeBorder(frame_rgb, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=[float(v) for v in glass])
    height, width = padded.shape[:2]
    disc = np.zeros((height, width), np.uint8)
    cv2.circle(disc, (width // 2, height // 2), int(min(height, width) * radius), 1, -1)
    padded[disc == 0] = 0
    return padded
