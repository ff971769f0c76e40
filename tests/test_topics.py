"""The MQTT surface has one home (edge/topics.py): the README's topic table says what it says, every
payload has a JSON Schema, and what the agent sends matches it."""

from __future__ import annotations

import json
import re

import pytest
from jsonschema import Draft202012Validator, FormatChecker

from edge.commands import agent_commands, answer
from edge.topics import SURFACE, Topics, schema
from tests.conftest import ROOT


def _valid(name: str, payload: object) -> None:
    errors = list(Draft202012Validator(schema(name), format_checker=FormatChecker()).iter_errors(payload))
    assert not errors, f"{name}: {errors[0].message} at {list(errors[0].absolute_path)}"


def test_the_readme_topic_table_is_the_surface():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| topic | QoS | retained | what |"):]
    rows = [line for line in table.splitlines()[2:] if line.startswith("|")][:len(SURFACE) + 1]
    rows = [row for row in rows if row.startswith("| `")]
    assert len(rows) == len(SURFACE), rows
    for row, spec in zip(rows, SURFACE):
        topic, qos, retained, what = [cell.strip() for cell in row.strip("|").split("|")]
        assert topic == f"`{spec.name}`" and qos == str(spec.qos) and retained == ("yes" if spec.retained else "no"), row
        assert f"({spec.schema_path})" in what, f"{row} does not link {spec.schema_path}"
        assert (ROOT / spec.schema_path).is_file()
    assert re.search(r"under `<topic_prefix>/<device_id>/` \(default prefix `leukoscope`\)", readme)


def test_every_schema_is_a_valid_json_schema():
    for spec in SURFACE:
        Draft202012Validator.check_schema(schema(spec.schema))


def test_topics_put_the_prefix_in_once_and_read_topics_back():
    topics = Topics("lab7/scopes", "scope-01")
    assert topics.results == "lab7/scopes/scope-01/results" and topics.sample("BM-42") == "lab7/scopes/scope-01/samples/BM-42"
    assert topics.command_name(topics.command("ping")) == "ping" and topics.everything() == "lab7/scopes/#"
    assert [topics.kind(t) for t in (topics.status, topics.results, topics.sample("x"), topics.stats, topics.reply("ping"),
                                     "lab7/scopes/scope-01/samples", "leukoscope/scope-01/results", "lab7/scopes/x/what")] == \
        ["status", "results", "samples", "stats", "reply", None, None, None]


def test_status_words_and_command_payloads_match_their_schemas():
    _valid("status", "online")
    _valid("status", "offline")
    with pytest.raises(AssertionError):
        _valid("status", "maybe")
    _valid("command", {"sample_id": "BM-42", "request_id": 3})
    with pytest.raises(AssertionError):
        _valid("command", {"sample_id": "a/b"})


def test_command_replies_match_their_schema():
    commands = agent_commands(None)  # type: ignore[arg-type]  # ping needs no agent
    for name, payload in (("ping", b'{"request_id": "r1"}'), ("ping", b"not json"), ("nope", b"{}"),
                          ("start_sample", b'{"sample_id": 5, "request_id": [1]}')):
        _, reply = answer(commands, name, payload)
        _valid("command-reply", json.loads(json.dumps(reply)))


def test_the_agent_stats_and_replies_match_their_schemas(tmp_path):
    from edge.agent import Agent, open_frames
    from edge.calibration import read_scale_file
    from edge.config import parse_config

    frames = ROOT / "samples" / "frames"
    agent = Agent(parse_config({"source": {"type": "folder", "path": str(frames)},
                                "segmentation": {"um_per_px": read_scale_file(frames)},
                                "mqtt": {"enabled": False}, "outbox": {"path": str(tmp_path / "o.db")},
                                "pipeline": {"sample_id": "S1"}}))
    for frame in list(open_frames(agent.config, lambda: False, print))[:2]:
        agent._commit(agent.step.analyse(frame))
    assert agent.counters["frames_processed"] == 2
    _valid("stats", json.loads(json.dumps(agent.stats())))
    for name, payload in (("summary", b""), ("stop_sample", b""), ("start_sample", b'{"sample_id": "S2"}'), ("ping", b"")):
        _, reply = answer(agent.commands, name, payload)
        assert reply["ok"], reply
        _valid("command-reply", json.loads(json.dumps(reply, default=str)))
    agent.outbox.close()
