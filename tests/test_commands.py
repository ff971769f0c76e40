"""Commands through the handler table, in-process: what a sender gets back for good and bad payloads,
how a new command is added, and the agent's sample actions that the MQTT handlers (and other front
ends) call."""

from __future__ import annotations

import json
import re
import sqlite3

import pytest

from edge.agent import Agent
from edge.calibration import read_scale_file
from edge.commands import answer
from edge.config import parse_config
from tests.conftest import ROOT

FRAMES = ROOT / "samples" / "frames"
ISO_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def _agent(tmp_path, sample_id: str | None = "S1", **extra) -> Agent:
    return Agent(parse_config({
        "source": {"type": "folder", "path": str(FRAMES)},
        "segmentation": {"um_per_px": read_scale_file(FRAMES)},
        "mqtt": {"enabled": False},
        "outbox": {"path": str(tmp_path / "outbox.sqlite3")},
        "pipeline": {"sample_id": sample_id},
        **extra,
    }))


def _rows(tmp_path) -> list[tuple[str, dict]]:
    with sqlite3.connect(tmp_path / "outbox.sqlite3") as db:
        return [(t, json.loads(p)) for t, p in db.execute("SELECT topic, payload FROM outbox ORDER BY id")]


def test_ping_answers_iso_8601_time_like_every_payload():
    _, reply = answer({"ping": lambda body: {"time": "x"}}, "ping", b"")
    assert reply["ok"]
    from edge.commands import agent_commands

    _, reply = answer(agent_commands(None), "ping", b'{"request_id": 7}')  # type: ignore[arg-type]  # ping needs no agent
    assert reply["ok"] and reply["request_id"] == 7 and ISO_TIME.fullmatch(reply["time"]), reply


def test_a_payload_that_is_not_json_gets_an_example_for_that_command():
    from edge.commands import agent_commands

    commands = agent_commands(None)  # type: ignore[arg-type]
    _, reply = answer(commands, "ping", b"hello")
    assert not reply["ok"] and "sample_id" not in reply["error"] and "{}" in reply["error"]
    _, reply = answer(commands, "start_sample", b"BM-42")
    assert not reply["ok"] and '{"sample_id": "BM-42"}' in reply["error"]
    _, reply = answer(commands, "nope", b"{}")
    assert not reply["ok"] and "unknown command 'nope'" in reply["error"] and "ping" in reply["error"]


def test_a_command_is_added_by_putting_a_handler_in_the_table():
    commands = {"echo": lambda body: {"echo": body["x"]}}
    reply_to, reply = answer(commands, "echo", b'{"x": 3, "reply_to": "mine"}')
    assert reply_to == "mine" and reply == {"ok": True, "command": "echo", "request_id": None, "echo": 3}
    _, reply = answer({"bad": lambda body: (_ for _ in ()).throw(ValueError("send y"))}, "bad", b"{}")
    assert reply == {"ok": False, "command": "bad", "request_id": None, "error": "send y"}


def test_sample_actions_are_public_methods(tmp_path):
    agent = _agent(tmp_path, sample_id=None)
    assert agent.current_summary() is None
    with pytest.raises(ValueError, match="no sample is open"):
        agent.stop_sample()
    assert agent.start_sample("BM-1") is None  # nothing was open, nothing closed
    assert agent.current_summary()["sample_id"] == "BM-1"
    closed = agent.start_sample("BM-2")
    assert closed["sample_id"] == "BM-1" and closed["final"] is True
    final = agent.stop_sample()
    assert final["sample_id"] == "BM-2" and final["final"] and agent.current_summary() is None
    assert [t.rsplit("/", 1)[1] for t, _ in _rows(tmp_path)] == ["BM-1", "BM-2"]  # each closed sample, retained


def test_frames_outside_a_sample_have_results_but_no_summary(tmp_path, caplog):
    """After stop_sample (or with no sample configured) results go on, with sample_id null; no
    summary topic is made up for them, and the log says so in words."""
    agent = _agent(tmp_path, sample_id=None)
    with caplog.at_level("INFO"):
        assert agent.run() == 0
    rows = _rows(tmp_path)
    assert rows and all(t.endswith("/results") and body["sample_id"] is None for t, body in rows)
    assert "sample None" not in caplog.text and "analysed outside a sample" in caplog.text
