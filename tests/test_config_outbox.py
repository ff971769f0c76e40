"""Agent config validation (one line naming the key) and the durable outbox."""

import os
import sqlite3
import subprocess
import sys

import pytest

from edge.cli import main
from edge.config import load_config, parse_config
from edge.errors import UserError
from edge.outbox import Outbox
from tests.conftest import ROOT

EXAMPLE = ROOT / "firmware_config" / "leukoscope.toml"


def test_example_config_is_valid_and_documents_every_section():
    config = load_config(EXAMPLE)
    assert config.source.type == "picamera2"
    text = EXAMPLE.read_text()
    for section in ("device", "source", "segmentation", "classifier", "mqtt", "mqtt.tls", "outbox", "pipeline", "review", "updates"):
        assert f"[{section}]" in text


def test_defaults_live_in_code():
    config = parse_config({"source": {"type": "folder", "path": "/frames"}})
    assert config.mqtt.port == 1883 and config.outbox.when_full == "drop_oldest"
    assert config.classifier.bundle == ROOT / "models" / "default"


def test_interpreter_threads_default_to_each_workers_share_of_the_cores(monkeypatch):
    """Frames are analysed ``pipeline.workers`` at a time: unset, the model takes the cores each has."""
    for cores, workers, threads in [(4, 2, 2), (2, 2, 1), (4, 1, 4), (4, 3, 1), (1, 2, 1)]:
        monkeypatch.setattr(os, "cpu_count", lambda cores=cores: cores)
        config = parse_config({"source": {"type": "folder", "path": "/f"}, "pipeline": {"workers": workers}})
        assert config.interpreter_threads == threads
    set_by_hand = parse_config({"source": {"type": "folder", "path": "/f"}, "classifier": {"num_threads": 3}})
    assert set_by_hand.interpreter_threads == 3


@pytest.mark.parametrize("data, message", [
    ({}, "source: required"),
    ({"source": {"type": "webcam"}}, "unknown source type 'webcam'"),
    ({"source": {"type": "folder", "path": "/f", "fsp": 3}}, "source.folder.fsp: unknown key"),
    ({"source": {"type": "folder", "path": "/f"}, "mqtt": {"port": "high"}}, "mqtt.port: Input should be a valid integer"),
    ({"source": {"type": "folder", "path": "/f"}, "mqtt": {"port": 70000}}, "mqtt.port: Input should be less than or equal to 65535"),
    ({"source": {"type": "folder", "path": "/f"}, "mqtt": {"password_file": "/p"}}, "password_file is set but username is not"),
    ({"source": {"type": "folder", "path": "/f"}, "mqtt": {"topic_prefix": "lab/#"}}, "mqtt.topic_prefix: use a plain topic path"),
    ({"source": {"type": "folder", "path": "/f"}, "device": {"id": "scope 1"}}, "device.id: use 1-64 letters"),
    ({"source": {"type": "folder", "path": "/f"}, "outbox": {"when_full": "explode"}}, "outbox.when_full"),
    ({"source": {"type": "folder", "path": "/f"}, "classifer": {}}, "classifer: unknown key"),
    ({"source": {"type": "folder", "path": "/f"}, "updates": {"enabled": True}}, "updates: enabled without public_key"),
    ({"source": {"type": "folder", "path": "/f"}, "updates": {"public_key": "abc"}}, "updates.public_key: must be a base64 Ed25519"),
])
def test_bad_config_gives_one_line_naming_the_key(data, message):
    with pytest.raises(UserError, match=message) as caught:
        parse_config(data)
    assert "\n" not in str(caught.value)


def test_bad_config_files(tmp_path, capsys):
    broken = tmp_path / "broken.toml"
    broken.write_text("[mqtt\nhost = 1")
    assert main(["run", "--config", str(broken)]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    assert main(["run", "--config", str(tmp_path / "absent.toml")]) == 2
    assert "does not exist; copy firmware_config/leukoscope.toml" in capsys.readouterr().err


def test_check_reports_each_failure_on_one_line(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text(f'[source]\ntype = "folder"\npath = "{tmp_path / "none"}"\n[classifier]\nbundle = "{tmp_path / "nobundle"}"\n'
                      f'[mqtt]\nhost = "127.0.0.1"\nport = 1\n[outbox]\npath = "{tmp_path / "o.db"}"\n')
    assert main(["check", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    fails = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert [f.split(":")[0] for f in fails] == ["FAIL model", "FAIL camera", "FAIL broker"]
    assert "ok   outbox" in out


def test_password_comes_from_the_credentials_directory(tmp_path, monkeypatch):
    (tmp_path / "mqtt-password").write_text("s3cret\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    config = parse_config({"source": {"type": "folder", "path": "/f"}, "mqtt": {"username": "u", "password_file": "mqtt-password"}})
    assert config.mqtt.password() == "s3cret"
    assert "s3cret" not in repr(config)


def test_outbox_survives_reopen_and_acks_remove(tmp_path):
    path = tmp_path / "o.db"
    box = Outbox(path)
    ids = [box.put("t/results", f"m{i}".encode()) for i in range(5)]
    box.close()
    box = Outbox(path)  # as after a crash and restart
    assert [m.payload for m in box.pending()] == [b"m0", b"m1", b"m2", b"m3", b"m4"]
    box.ack(ids[:2])
    assert len(box) == 3 and [m.id for m in box.pending(after=ids[2])] == ids[3:]
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_outbox_sequence_persists_and_is_taken_with_the_row(tmp_path):
    path = tmp_path / "o.db"
    box = Outbox(path)
    for _ in range(3):
        box.put_numbered("t/results", lambda n: f"r{n}".encode())
    box.close()
    box = Outbox(path)  # as after a crash and restart: the numbers go on
    box.put_numbered("t/results", lambda n: f"r{n}".encode())

    def broken(n: int) -> bytes:
        raise ValueError("not serialisable")

    with pytest.raises(ValueError):
        box.put_numbered("t/results", broken)  # rolled back: no row, no number used up
    box.put_numbered("t/results", lambda n: f"r{n}".encode())
    assert [m.payload for m in box.pending()] == [b"r1", b"r2", b"r3", b"r4", b"r5"] and box.sequence == 5


def test_a_result_refused_by_a_full_outbox_keeps_its_number(tmp_path):
    box = Outbox(tmp_path / "o.db", max_messages=2, when_full="drop_newest")
    assert [box.put_numbered("t", lambda n: f"r{n}".encode()) is None for _ in range(3)] == [False, False, True]
    box.ack([m.id for m in box.pending()])
    box.put_numbered("t", lambda n: f"r{n}".encode())
    assert [m.payload for m in box.pending()] == [b"r4"]  # the gap at 3 is what a subscriber sees of the drop


@pytest.mark.parametrize("policy, kept", [("drop_oldest", [b"m2", b"m3", b"m4"]), ("drop_newest", [b"m0", b"m1", b"m2"])])
def test_outbox_is_bounded_and_counts_what_it_drops(tmp_path, policy, kept):
    box = Outbox(tmp_path / "o.db", max_messages=3, when_full=policy)
    results = [box.put("t", f"m{i}".encode()) for i in range(5)]
    assert [m.payload for m in box.pending()] == kept
    assert box.dropped == 2 and len(box) == 3
    assert (results.count(None) == 2) == (policy == "drop_newest")


def test_outbox_unwritable_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="outbox .* cannot be opened"):
        Outbox(blocker / "sub" / "o.db")


def test_the_publisher_and_outbox_import_without_opencv():
    """A broker bridge or the collector reuses the publisher and outbox; they must not drag in OpenCV."""
    code = ("import sys\nfor name in ('cv2', 'tensorflow', 'keras'):\n    sys.modules[name] = None\n"
            "import edge.publisher, edge.outbox, edge.config_mqtt\nprint('ok')")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert done.stdout.strip() == "ok", done.stderr
