"""The results collector against a real mosquitto: repeats stored once, dead letters kept, gaps reported,
the persistent session across a collector outage, one-line errors, reports, and no TensorFlow/OpenCV."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from collector.cli import main
from collector.config import load_config, parse_config
from collector.report import build_report, to_html
from collector.store import Store
from edge import DISCLAIMER
from edge.errors import UserError
from edge.results import SampleTally, frame_result, numbered
from tests.broker import MOSQUITTO, Broker, free_port
from tests.conftest import ROOT

needs_mosquitto = pytest.mark.skipif(MOSQUITTO is None, reason="the collector's tests need mosquitto (apt-get install mosquitto)")
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


class Database:
    """Where a test's collector stores: the SQLite file, or a fresh database on the test PostgreSQL server."""

    def __init__(self, tmp_path: Path, url: str | None = None) -> None:
        self.url = url
        self.path = tmp_path / "results.sqlite3"
        self.toml = f'url = "{url}"\n' if url else f'path = "{self.path}"\n'

    def open(self) -> Store:
        return Store(url=self.url) if self.url else Store(self.path)

    def count(self, table: str) -> int:
        if not self.url and not self.path.exists():
            return 0
        store = None
        try:
            store = self.open()  # migrates an empty database: the table then exists with no rows
            return store.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
        finally:
            if store:
                store.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path) -> Database:
    if request.param == "sqlite":
        return Database(tmp_path)
    return Database(tmp_path, request.getfixturevalue("postgres_server").new_database())


def write_config(tmp_path: Path, port: int, extra: str = "", database: Database | None = None) -> Path:
    path = tmp_path / "collector.toml"
    database = database or Database(tmp_path)
    path.write_text(f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\nclient_id = "test-collector"\nconnect_timeout_s = 5\n{extra}'
                    f'[database]\n{database.toml}[batch]\nmax_messages = 50\nmax_delay_ms = 50\n')
    return path


class CollectorProcess(subprocess.Popen):
    """``collect run`` in a child process, stopped with SIGTERM like systemd does."""

    def __init__(self, config: Path) -> None:
        self.log_path = config.with_suffix(".log")
        self._log = self.log_path.open("w")
        super().__init__([sys.executable, "-m", "collector.cli", "run", "--config", str(config)], cwd=ROOT, env=ENV,
                         stdout=self._log, stderr=subprocess.STDOUT, text=True)

    def wait_connected(self, timeout: float = 10.0) -> None:
        """Until the broker acknowledged the subscriptions: what is published after that is the session's."""
        deadline = time.monotonic() + timeout
        while "subscribed (QoS 1" not in self.log_path.read_text():
            assert self.poll() is None and time.monotonic() < deadline, self.log_path.read_text()
            time.sleep(0.05)

    def stop(self) -> int:
        self.send_signal(signal.SIGTERM)
        code = self.wait(timeout=15)
        self._log.close()
        return code


def device(port: int, client_id: str = "scope-01") -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


def publish(client: mqtt.Client, topic: str, payload: bytes, *, retain: bool = False) -> None:
    client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(timeout=5)


FINE_LIGHT = {"brightest": 226, "darkest": 164, "colourful": 86, "problem": None}
OVEREXPOSED = {"brightest": 255, "darkest": 255, "colourful": 40, "problem": "overexposed"}


def result(sequence: int, *, device_id: str = "scope-01", sample: str = "BM-42", scores: tuple[float, ...] = (0.9, 0.2),
           light: dict = FINE_LIGHT) -> bytes:
    cells = [{"bbox": [10, 10, 50, 50], "area": 2000, "p_all": p, "label": "all" if p >= 0.5 else "hem", "focus": 300.0} for p in scores]
    gated = [{"bbox": [0, 0, 40, 40], "area": 900, "reason": "cut by border", "focus": 120.0}]
    body = frame_result(device_id=device_id, sample_id=sample, source=f"test#{sequence}", cells=cells, timings_ms={"total": 5.0},
                        captured_at=1_790_000_000 + sequence, positive_label="all", unclassified=gated, focus=300.0, min_focus=50.0,
                        light=light)
    return numbered(body, sequence)


def count(db: Path | Database, table: str) -> int:
    if isinstance(db, Database):
        return db.count(table)
    if not db.exists():
        return 0
    with sqlite3.connect(db) as connection:
        try:
            return connection.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
        except sqlite3.OperationalError:  # not created yet
            return 0


def wait_rows(db: Path | Database, table: str, expected: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while count(db, table) < expected and time.monotonic() < deadline:
        time.sleep(0.05)
    assert count(db, table) == expected


@needs_mosquitto
def test_repeats_stored_once_dead_letters_kept_gap_reported_and_report(tmp_path, broker, capsys, database):
    config = write_config(tmp_path, broker.port, database=database)
    db = database
    collector = CollectorProcess(config)
    collector.wait_connected()
    scope = device(broker.port)
    second = result(2)
    for payload in (result(1), second, second, result(4, light=OVEREXPOSED)):  # #2 twice (a QoS 1 redelivery), #3 never sent
        publish(scope, "leukoscope/scope-01/results", payload)
    invalid = json.loads(result(5))
    invalid["counts"]["cells"] = -1
    publish(scope, "leukoscope/scope-01/results", json.dumps(invalid).encode())
    publish(scope, "leukoscope/scope-01/results", b"{not json")
    tally = SampleTally("BM-42")
    for sequence in (1, 2, 3, 4):
        tally.add(json.loads(result(sequence, light=OVEREXPOSED if sequence == 4 else FINE_LIGHT)))
    assert tally.summary("scope-01")["frame_problems"] == {"overexposed": 1}
    publish(scope, "leukoscope/scope-01/samples/BM-42", json.dumps(tally.summary("scope-01", final=True)).encode(), retain=True)
    publish(scope, "leukoscope/scope-01/status", b"online", retain=True)
    publish(scope, "leukoscope/scope-01/stats", json.dumps({"device_id": "scope-01", "scale": {"um_per_px": 0.083}}).encode())
    wait_rows(db, "dead_letters", 2)
    wait_rows(db, "frame_results", 3)
    wait_rows(db, "device_stats", 1)
    assert collector.stop() == 0
    scope.loop_stop()

    store = db.open()
    reasons = sorted(reason for _, _, reason, _ in store.dead_letters())
    assert reasons[0].startswith("does not match edge/schemas/frame-result.schema.json at counts/cells")
    assert reasons[1].startswith("not JSON")
    assert {payload for _, _, _, payload in store.dead_letters()} >= {b"{not json"}
    assert store.execute("SELECT status FROM device_status WHERE device_id = 'scope-01'").fetchone() == ("online",)
    store.close()

    assert main(["gaps", "--config", str(config)]) == 3
    out = capsys.readouterr().out
    assert "scope-01: 3 results, sequence 1..4, 1 missing" in out and "gap scope-01 #3: 1 result(s) never received" in out

    assert main(["report", "BM-42", "--format", "csv", "--config", str(config)]) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    blank = rows.index([])
    summary, frames = dict(rows[1:blank]), rows[blank + 2:]
    assert rows[0] == ["field", "value"] and rows[blank + 1][:3] == ["device_id", "run_id", "sequence"]
    assert (summary["frames stored"], summary["classified cells"], summary["ALL blasts"]) == ("3", "6", "3")
    assert summary["blast fraction"] == "50.0% (95% CI 18.8% to 81.2%, Wilson)"
    assert summary["unclassified: cut by border"] == "3"
    assert summary["device scope-01: its own tally"] == "4 frames, 8 cells, 4 blasts (final)"
    assert summary["missing results"] == "scope-01 #3..3 (1)" and summary["device scope-01: scale"] == "0.083 µm/px"
    assert summary["disclaimer"] == DISCLAIMER
    assert [int(row[2]) for row in frames] == [1, 2, 4]  # one row per stored frame, the repeat once
    assert summary["frames that could show no cells"] == summary["frames that could show no cells: overexposed"] == "1"
    assert [row[-1] for row in frames] == ["", "", "overexposed"] and rows[blank + 1][-1] == "light_problem"

    out_file = tmp_path / "BM-42.html"
    assert main(["report", "BM-42", "--out", str(out_file), "--config", str(config)]) == 0
    page = out_file.read_text()
    assert DISCLAIMER in page and "<h1>Sample BM-42</h1>" in page
    pytest.importorskip("matplotlib")
    assert "<svg" in page and "Score histogram" in page


@needs_mosquitto
def test_persistent_session_keeps_what_the_device_sent_while_the_collector_was_down(tmp_path, broker, database):
    config = write_config(tmp_path, broker.port, database=database)
    db = database
    collector = CollectorProcess(config)
    collector.wait_connected()
    assert collector.stop() == 0  # the broker now holds a session for client id test-collector
    scope = device(broker.port)
    for sequence in range(1, 201):
        publish(scope, "leukoscope/scope-01/results", result(sequence))
    scope.loop_stop()
    collector = CollectorProcess(config)
    wait_rows(db, "frame_results", 200)
    assert "resumed session" in collector.log_path.read_text()
    assert collector.stop() == 0
    store = db.open()
    assert store.gaps() == [] and store.sequence_ranges() == [("scope-01", 200, 1, 200, 0)]
    store.close()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "collector.cli", *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=30)


def test_broker_down_is_one_line_and_exit_1(tmp_path):
    done = run_cli("run", "--config", str(write_config(tmp_path, free_port())))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("collect: error: cannot reach the broker at 127.0.0.1:")
    assert "start mosquitto there or fix mqtt.host and mqtt.port" in done.stderr and "Traceback" not in done.stderr


@needs_mosquitto
def test_refused_credentials_are_one_line_and_exit_2(tmp_path):
    passwords = tmp_path / "passwords"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), "collector", "right"], check=True, capture_output=True)
    secret = tmp_path / "secret"
    secret.write_text("wrong\n")
    broker = Broker(tmp_path / "broker", password_file=passwords).start()
    try:
        done = run_cli("run", "--config", str(write_config(tmp_path, broker.port, f'username = "collector"\npassword_file = "{secret}"\n')))
    finally:
        broker.stop()
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (f"collect: error: broker 127.0.0.1:{broker.port} refused the collector: Not authorized; "
                                   "check mqtt.username, mqtt.password_file and the broker's ACL")


def test_bad_config_names_the_key(tmp_path):
    path = tmp_path / "collector.toml"
    path.write_text('[mqtt]\nport = "high"\nhots = "x"\n')
    done = run_cli("run", "--config", str(path))
    assert done.returncode == 2
    assert done.stderr.strip() == (f"collect: error: {path}: mqtt.port: Input should be a valid integer, unable to parse string "
                                   "as an integer (got 'high'); mqtt.hots: unknown key; remove it or check its spelling "
                                   "(see firmware_config/collector.toml)")
    with pytest.raises(UserError, match="does not exist; copy firmware_config/collector.toml there"):
        load_config(tmp_path / "missing.toml")


def test_example_config_is_valid_and_shows_the_defaults():
    example = load_config(ROOT / "firmware_config" / "collector.toml")
    assert example.model_dump(exclude={"database"}) == parse_config({}).model_dump(exclude={"database"})
    assert example.database.path == Path("/var/lib/leukoscope-collector/results.sqlite3")


@pytest.mark.parametrize("change", [
    lambda b: b.update(message_id="not-a-uuid"), lambda b: b.update(time="yesterday"), lambda b: b.update(extra=1),
    lambda b: b["counts"].update(cells=-1), lambda b: b.pop("run_id"), lambda b: b.update(schema_version=9),
    lambda b: b.update(bundle="XYZ"), lambda b: b["cells"][0].update(p_all="high"), lambda b: b.update(sequence=0),
])
def test_invalid_results_become_dead_letters(change):
    """The fast validator accepts only what the schema accepts (jsonschema words the reason)."""
    from collector.messages import DeadLetter, classify

    body = json.loads(result(1))
    assert not isinstance(classify("leukoscope/scope-01/results", json.dumps(body).encode(), "leukoscope"), DeadLetter)
    change(body)
    letter = classify("leukoscope/scope-01/results", json.dumps(body).encode(), "leukoscope")
    assert isinstance(letter, DeadLetter) and letter.reason.startswith("does not match edge/schemas/frame-result.schema.json at")


def test_imports_neither_tensorflow_nor_opencv():
    code = ("import sys\nfor name in ('cv2', 'tensorflow', 'keras'):\n    sys.modules[name] = None\n"
            "import collector.cli, collector.service, collector.report, collector.store, collector.messages\n"
            "collector.cli.build_parser()\nprint('ok')")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=30)
    assert done.stdout.strip() == "ok", done.stderr


def test_migrations_are_numbered_and_rerunnable(database):
    from collector.store import SCHEMA_VERSION

    store = database.open()
    assert store.schema_version() == SCHEMA_VERSION == 3
    store.close()
    store = database.open()  # opening again migrates nothing and keeps the version
    assert store.schema_version() == SCHEMA_VERSION
    store.execute("UPDATE schema_version SET version = 99")
    store.close()
    with pytest.raises(UserError, match=f"has schema version 99, newer than this collector's {SCHEMA_VERSION}; upgrade leukoscope"):
        database.open()


def test_a_version_1_database_gains_the_review_labels_table_and_keeps_its_results(database, monkeypatch):
    from collector import store as store_module
    from collector.messages import classify

    monkeypatch.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:1])
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", 1)
    old = database.open()  # as the collector before review labels left it
    # as that collector wrote it (today's ``write`` also fills migration 3's stored_order)
    old.execute(store_module.RESULT_INSERT, store_module._result_row(classify("leukoscope/scope-01/results", result(1), "leukoscope"), 0.0))
    assert old.schema_version() == 1
    old.close()
    monkeypatch.undo()
    store = database.open()
    assert store.schema_version() == 3 and store.sequence_ranges() == [("scope-01", 1, 1, 1, 0)]
    assert store.out_of_order() == 0
    assert store.execute("SELECT COUNT(*) FROM review_labels").fetchone()[0] == 0
    store.close()


def test_the_store_keeps_the_order_results_arrived_in_and_counts_a_device_going_backwards(database):
    """The fleet benchmark's order check: the database records arrival order (SQLite's rowid, PostgreSQL's
    stored_order drawn row by row in the batch), so a result stored after a later one of its device is seen."""
    from collector.messages import classify

    store = database.open()
    message = lambda sequence, device="scope-01": classify(f"leukoscope/{device}/results", result(sequence, device_id=device), "leukoscope")  # noqa: E731
    first = [message(s) for s in (1, 2, 3)]
    store.write(first + [message(s, "scope-02") for s in (2, 1)])
    assert store.out_of_order() == 1  # scope-02 sent 2 before 1
    store.write([message(s) for s in (5, 4, 6)])
    assert store.out_of_order() == 2
    store.write([first[2]])  # a redelivery (same message_id) changes nothing, in order or not
    assert store.out_of_order() == 2
    store.close()


@pytest.mark.parametrize("database_section, message", [
    ('url = "postgresql://lab:secret@db.lab/results"\n', "database.url: holds a password; put it in a file named by database.password_file"),
    ('url = "mysql://db.lab/results"\n', "database.url: use postgresql://USER@HOST:PORT/DATABASE"),
    ('url = "postgresql://db.lab/results"\npath = "/tmp/x.sqlite3"\n', "database: set database.path (SQLite) or database.url"),
    ('password_file = "pw"\n', "database: password_file is for PostgreSQL"),
])
def test_database_config_mistakes_are_one_line(tmp_path, database_section, message):
    path = tmp_path / "collector.toml"
    path.write_text(f"[database]\n{database_section}")
    with pytest.raises(UserError, match=re.escape(message)) as caught:
        load_config(path)
    assert "\n" not in str(caught.value)


def test_an_unreachable_postgresql_is_one_line_and_exit_2(tmp_path):
    pytest.importorskip("psycopg", reason="the PostgreSQL driver is not installed (pip install 'leukoscope[collector]')")
    path = tmp_path / "collector.toml"
    path.write_text(f'[mqtt]\nport = {free_port()}\n[database]\nurl = "postgresql://nobody@127.0.0.1:{free_port()}/results"\n')
    done = run_cli("gaps", "--config", str(path))
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith("collect: error: database postgresql://nobody@127.0.0.1:") and "check database.url" in done.stderr


def test_html_report_without_matplotlib_says_so(tmp_path, monkeypatch):
    from collector.messages import classify

    store = Store(tmp_path / "db.sqlite3")
    store.write([classify("leukoscope/scope-01/results", result(1), "leukoscope")])
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    page = to_html(build_report(store, "BM-42"))
    assert "Score histogram omitted: matplotlib is not installed (pip install matplotlib)." in page and "<svg" not in page
    with pytest.raises(UserError, match="no results stored for sample 'BM-43'"):
        build_report(store, "BM-43")
    store.close()


@needs_mosquitto
@pytest.mark.slow
def test_review_labels_from_a_real_agent_are_stored_once_and_reported(tmp_path, broker, capsys, request):
    """A real agent's page labels three cells of a sample; collectors on SQLite and PostgreSQL (both, where
    PostgreSQL runs) store each label once, keep an invalid one as a dead letter, and report them."""
    from tests.postgres import why_unavailable
    from tests.web_helpers import RunningAgent, agent_config, wait_for

    databases = [Database(tmp_path / "sqlite")]
    if why_unavailable() is None:
        databases.append(Database(tmp_path / "pg", request.getfixturevalue("postgres_server").new_database()))
    collectors = []
    for number, database in enumerate(databases):
        folder = tmp_path / f"collector{number}"
        folder.mkdir()
        config = write_config(folder, broker.port, database=database)
        config.write_text(config.read_text().replace('"test-collector"', f'"review-collector-{number}"'))
        collectors.append((config, CollectorProcess(config)))
    for _, collector in collectors:
        collector.wait_connected()
    with RunningAgent(agent_config(tmp_path, mqtt_port=broker.port)) as running:
        running.agent.start_sample("BM-7")
        web = running.agent.web
        assert wait_for(lambda: len([c for c in web.store.pending(limit=50) if c["sample_id"] == "BM-7"]) >= 3, 90)
        crops = [c["id"] for c in web.store.pending(limit=50) if c["sample_id"] == "BM-7"][:3]
        for crop, label in zip(crops, ("blast", "normal", "unsure")):
            web.label(crop, label, "R1", "loopback")
        web.label(crops[1], "blast", "R2", "loopback")  # the same crop again: its latest label counts
        for database in databases:  # through the agent's outbox and publisher, to every collector
            wait_rows(database, "review_labels", 4, timeout=30)
    labels = review_payloads(tmp_path / "reviews.sqlite3")
    scope = device(broker.port, "resender")
    publish(scope, "leukoscope/w1/reviews", labels[0])  # a QoS 1 redelivery: stored once
    broken = json.loads(labels[0])
    broken["label"] = "maybe"
    publish(scope, "leukoscope/w1/reviews", json.dumps(broken).encode())
    scope.loop_stop()
    for (config, collector), database in zip(collectors, databases):
        wait_rows(database, "review_labels", 4)
        wait_rows(database, "dead_letters", 1)
        assert collector.stop() == 0
        store = database.open()
        (reason,) = [reason for _, _, reason, _ in store.dead_letters()]
        assert reason.startswith("does not match edge/schemas/review-label.schema.json at label")
        store.close()
        assert main(["report", "BM-7", "--format", "csv", "--config", str(config)]) == 0
        rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
        summary = dict(rows[1:rows.index([])])
        selected = {json.loads(p)["crop_id"]: json.loads(p)["cell"]["selected"] for p in labels}
        latest = {crops[0]: "blast", crops[1]: "blast", crops[2]: "unsure"}
        judged = [c for c in crops if latest[c] != "unsure"]
        agreed = sum((selected[c] == "flagged") == (latest[c] == "blast") for c in judged)
        assert summary["review labels"] == "3 cells reviewed"
        assert (summary["review labels: blast"], summary["review labels: unsure"]) == ("2", "1")
        assert "review labels: normal" not in summary
        assert summary["review agreement with the model"] == f"{agreed} of 2 ({agreed / 2:.0%})"


def review_payloads(path: Path) -> list[bytes]:
    """The label payloads a device's review database holds, oldest first."""
    with sqlite3.connect(path) as connection:
        return [bytes(row[0]) for row in connection.execute("SELECT payload FROM labels ORDER BY id")]
