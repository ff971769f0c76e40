"""The README's first command, end to end: `edge demo` on the bundled frames with the bundled model."""

import sqlite3

from edge.cli import main
from tests.broker import MOSQUITTO


def test_demo_runs_end_to_end(tmp_path, capsys):
    assert main(["demo", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "=== demo summary ===" in out
    assert "6 frames analysed" in out and "white cells found" in out
    assert "composed frames (real C-NMC cells of known label)" in out
    assert "not a diagnostic device" in out
    if MOSQUITTO:
        assert "6 of 6 frame results delivered through the broker" in out
        with sqlite3.connect(tmp_path / "outbox.sqlite3") as db:  # everything acknowledged, nothing left behind
            assert db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 0
    else:
        assert "no mosquitto found" in out
    review = tmp_path / "review"
    assert len(list(review.glob("*.jpg"))) == 6, "every frame annotated, for a person to open"
