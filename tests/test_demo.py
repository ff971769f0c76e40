"""The README's first command, end to end: `edge demo` on the bundled frames with the bundled model."""

import sqlite3

import pytest

from edge.cli import main
from tests.broker import MOSQUITTO

pytestmark = pytest.mark.slow  # the whole agent, a broker and a subscriber


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


def test_the_demo_honours_the_topic_prefix(tmp_path, capsys):
    """Its subscriber watches the configured prefix, so every result is seen under another prefix too."""
    if not MOSQUITTO:
        pytest.skip("the demo's broker needs mosquitto")
    assert main(["demo", "--workdir", str(tmp_path), "--topic-prefix", "lab7/scopes"]) == 0
    out = capsys.readouterr().out
    assert "6 of 6 frame results delivered through the broker" in out and "lab7/scopes/demo-scope/results" in out


def test_demo_and_replay_make_the_same_crops_from_the_same_frames(tmp_path, capsys):
    """Both read the frames' scale from one place, so a cell gets the same p(ALL) in either."""
    import json

    from edge.agent import Agent
    from edge.config import parse_config
    from edge.demo import SAMPLES, demo_config

    Agent(parse_config(demo_config(tmp_path, SAMPLES, None, None))).run()
    with sqlite3.connect(tmp_path / "outbox.sqlite3") as db:
        payloads = [json.loads(p) for (t, p) in db.execute("SELECT topic, payload FROM outbox") if t.endswith("/results")]
    demo = {r["source"]: [(c["bbox"], c["p_all"]) for c in r["cells"]] for r in payloads}
    capsys.readouterr()
    assert main(["replay", "--source", str(SAMPLES), "--json"]) == 0
    *results, _ = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    replay = {r["source"]: [(c["bbox"], c["p_all"]) for c in r["cells"]] for r in results}
    assert demo == replay and sum(len(v) for v in demo.values()) >= 9
