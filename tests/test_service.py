"""The edge agent against a real broker: nothing lost across broker restarts, SIGKILL and the wrap of
MQTT message ids, a sequence that goes on across restarts, last will, credentials, TLS, and a storm of
malformed commands."""

from __future__ import annotations

import json
import random
import re
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

import paho.mqtt.client as mqtt
import pytest
from jsonschema import Draft202012Validator, FormatChecker
from paho.mqtt.enums import CallbackAPIVersion

import edge.agent
from edge.config import MQTTConfig, parse_config
from edge.outbox import Outbox
from edge.publisher import Publisher
from edge.topics import schema
from tests.broker import MOSQUITTO, Broker, Relay, free_port
from tests.conftest import BCCD, ROOT, wait_for
from tests.publishing_child import TOPIC

pytestmark = pytest.mark.slow
needs_mosquitto = pytest.mark.skipif(MOSQUITTO is None, reason="credentials/TLS tests need mosquitto (apt-get install mosquitto)")


@pytest.fixture
def frames(tmp_path) -> Path:
    folder = tmp_path / "frames"
    folder.mkdir()
    sources = sorted((BCCD / "JPEGImages").glob("*.jpg"))[:12] if BCCD.is_dir() else sorted((ROOT / "samples" / "frames").glob("*.jpg"))
    for number, path in enumerate(sources * 3):  # 36 frames (or more) to give the run some length
        shutil.copy(path, folder / f"{number:03d}_{path.name}")
    return folder


def write_config(path: Path, *, port: int, frames: Path, outbox: Path, fps: float | None = None, loop: bool = False,
                 extra: str = "", device: str = "t1") -> Path:
    source = f'[source]\ntype = "folder"\npath = "{frames}"\nloop = {str(loop).lower()}\n' + (f"fps = {fps}\n" if fps else "")
    path.write_text(f'[device]\nid = "{device}"\n{source}[segmentation]\num_per_px = 0.083\n'
                    f'[classifier]\nbundle = "{ROOT / "models" / "default"}"\nnum_threads = 1\n'
                    f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\nkeepalive_s = 5\nstats_interval_s = 1\nreconnect_max_s = 2\n{extra}\n'
                    f'[outbox]\npath = "{outbox}"\n[pipeline]\nsample_id = "S1"\n')
    return path


class Agent(subprocess.Popen):
    """``edge run`` in a child process; its log goes to a file (a full pipe would block the agent)."""

    def __init__(self, config: Path) -> None:
        self.log_path = config.with_suffix(".log")
        self._log = self.log_path.open("w")
        super().__init__([sys.executable, "-m", "edge.cli", "run", "--config", str(config)], cwd=ROOT,
                         stdout=self._log, stderr=subprocess.STDOUT, text=True)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()


def start_agent(config: Path) -> Agent:
    return Agent(config)



class Subscriber:
    """A real paho subscriber with a persistent session, so the broker queues for it while it is away."""

    def __init__(self, port: int, topic: str = "leukoscope/#", client_id: str = "test-subscriber") -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.2, 1)
        self.client.connect_async("127.0.0.1", port)
        self.client.loop_start()
        self.wait_for(lambda: self.client.is_connected(), 5)

    def _on_message(self, client, userdata, message) -> None:
        with self.lock:
            self.messages.append((message.topic, message.payload, message.retain))

    def wait_for(self, condition: Callable[[], object], timeout: float) -> bool:
        return wait_for(condition, timeout)

    def results(self) -> dict[str, dict]:
        with self.lock:
            return {json.loads(p)["message_id"]: json.loads(p) for t, p, _ in self.messages if t.endswith("/results")}

    def payloads(self, suffix: str) -> list[bytes]:
        with self.lock:
            return [p for t, p, _ in self.messages if t.endswith(suffix)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def outbox_backlog(outbox: Path) -> int:
    return len(pending_results(outbox)) if outbox.exists() else 0


def pending_results(outbox: Path) -> dict[str, dict]:
    """The results stored and not yet acknowledged ({} while the agent is still creating its outbox)."""
    with sqlite3.connect(outbox) as db:
        try:
            rows = db.execute("SELECT topic, payload FROM outbox").fetchall()
        except sqlite3.OperationalError as error:  # the file exists a moment before its tables
            if "no such table" not in str(error):
                raise
            return {}
    return {json.loads(p)["message_id"]: json.loads(p) for t, p in rows if t.endswith("/results")}


def test_results_arrive_with_status_and_summary(broker, frames, tmp_path):
    sub = Subscriber(broker.port)
    config = write_config(tmp_path / "a.toml", port=broker.port, frames=frames, outbox=tmp_path / "outbox.db")
    agent = start_agent(config)
    assert agent.wait(timeout=120) == 0, agent.log()
    count = len(list(frames.iterdir()))
    assert sub.wait_for(lambda: len(sub.results()) == count, 10)
    assert sorted(r["sequence"] for r in sub.results().values()) == list(range(1, count + 1))
    assert sub.wait_for(lambda: b"offline" in sub.payloads("/status"), 5)
    assert sub.payloads("/status")[0] == b"online"
    final = [json.loads(p) for p in sub.payloads("/samples/S1") if json.loads(p)["final"]]
    assert final and final[-1]["frames"] == count
    assert any(json.loads(p)["frames_processed"] for p in sub.payloads("/stats"))
    validators = {name: Draft202012Validator(schema(name), format_checker=FormatChecker())
                  for name in ("frame-result", "sample-summary", "stats")}
    for suffix, name in (("/results", "frame-result"), ("/samples/S1", "sample-summary"), ("/stats", "stats")):
        for payload in sub.payloads(suffix):
            validators[name].validate(json.loads(payload))
    assert len(pending_results(tmp_path / "outbox.db")) == 0  # acknowledged rows are gone
    sub.close()


def test_broker_restart_mid_run_loses_nothing(broker, frames, tmp_path):
    sub = Subscriber(broker.port)
    config = write_config(tmp_path / "a.toml", port=broker.port, frames=frames, outbox=tmp_path / "outbox.db", fps=12)
    agent = start_agent(config)
    assert sub.wait_for(lambda: b"online" in sub.payloads("/status"), 30), agent.log()
    broker.stop()
    # The broker comes back once the agent has seen it go and results wait for it (not after a guessed pause).
    assert wait_for(lambda: "disconnected from" in agent.log(), 30), agent.log()
    assert wait_for(lambda: outbox_backlog(tmp_path / "outbox.db") > 0, 30), agent.log()
    broker.start()
    assert agent.wait(timeout=120) == 0, agent.log()
    # A paced source drops frames when inference lags (a camera does): count what the agent produced.
    box = Outbox(tmp_path / "outbox.db")
    count = box.sequence
    box.close()
    assert count >= 10 and len(pending_results(tmp_path / "outbox.db")) == 0, (count, agent.log())
    assert sub.wait_for(lambda: len({r["sequence"] for r in sub.results().values()}) == count, 15), \
        (sorted(set(range(1, count + 1)) - {r["sequence"] for r in sub.results().values()}), agent.log())
    assert {r["sequence"] for r in sub.results().values()} == set(range(1, count + 1))
    # Said in words (a stop with our data still unread makes the broker reset the connection instead).
    assert re.search(r"disconnected from 127\.0\.0\.1:\d+: (the broker closed the connection|the connection was reset)",
                     agent.log()), [line for line in agent.log().splitlines() if "WARNING" in line]
    sub.close()


def test_sigterm_with_the_broker_down_waits_stop_timeout_then_keeps_the_rest(broker, frames, tmp_path):
    broker.stop()
    outbox = tmp_path / "outbox.db"
    agent = start_agent(write_config(tmp_path / "a.toml", port=broker.port, frames=frames, outbox=outbox, fps=20,
                                     loop=True, extra="stop_timeout_s = 1.5"))
    assert wait_for(lambda: outbox.exists() and pending_results(outbox), 30), agent.log()
    started = time.monotonic()
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(timeout=30) == 0, agent.log()
    assert 1.5 <= time.monotonic() - started < 5
    assert "stay in the outbox for the next start" in agent.log()


def test_a_broker_unreachable_at_start_is_said_at_once_and_a_finite_replay_fails_naming_the_count(frames, tmp_path):
    """No broker at start: the first failed connect is logged at once (not after a silent wait), and a
    replay that ends with results still undelivered exits non-zero, saying how many wait in the outbox."""
    port = free_port()  # nothing listens there
    outbox = tmp_path / "outbox.db"
    agent = start_agent(write_config(tmp_path / "a.toml", port=port, frames=frames, outbox=outbox,
                                     extra="stop_timeout_s = 0.5"))
    try:
        assert wait_for(lambda: "cannot connect to broker" in agent.log(), 20), agent.log()
        first = next(line for line in agent.log().splitlines() if "cannot connect to broker" in line)
        assert f"127.0.0.1:{port}" in first and "retrying with backoff" in first and "results wait in the outbox" in first
        assert agent.wait(timeout=120) == 1, agent.log()
    finally:
        agent.kill()
        agent.wait()
    left = len(pending_results(outbox))
    assert left and f"{left} result(s) were not delivered to 127.0.0.1:{port} and remain in the outbox" in agent.log(), agent.log()[-2000:]
    # On the backoff, not once per attempt (reconnect_max_s = 2 gives several attempts during the run).
    assert agent.log().count("cannot connect to broker") <= 3, agent.log()


def test_sigkill_mid_run_loses_nothing_and_the_sequence_goes_on(broker, frames, tmp_path):
    sub = Subscriber(broker.port)
    outbox = tmp_path / "outbox.db"
    agent = start_agent(write_config(tmp_path / "a.toml", port=broker.port, frames=frames, outbox=outbox, fps=12))
    assert sub.wait_for(lambda: len(sub.results()) >= 5, 60), agent.log()  # killed in the middle of the run
    agent.send_signal(signal.SIGKILL)
    agent.wait()
    stored = pending_results(outbox)  # written durably, not yet acknowledged
    seen = sub.results()
    produced = {r["sequence"] for r in list(stored.values()) + list(seen.values())}
    assert produced == set(range(1, max(produced) + 1)), "a result vanished between the pipeline and the outbox"

    two = tmp_path / "two"
    two.mkdir()
    for path in sorted(frames.iterdir())[:2]:
        shutil.copy(path, two)
    again = start_agent(write_config(tmp_path / "b.toml", port=broker.port, frames=two, outbox=outbox))
    assert again.wait(timeout=120) == 0, again.log()
    assert sub.wait_for(lambda: set(stored) <= set(sub.results()) and len(sub.results()) == len(produced) + 2, 15)
    results = sub.results().values()
    assert sorted(r["sequence"] for r in results) == list(range(1, len(produced) + 3)), "a gap or a reused number"
    first, second = ({r["run_id"] for r in results if (r["sequence"] > len(produced)) == restarted} for restarted in (False, True))
    assert len(first) == len(second) == 1 and first != second  # each run says which it is
    sub.close()


def _read_line(process: subprocess.Popen, timeout: float) -> str:
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    if not ready:
        process.kill()
        pytest.fail(f"no answer from the child within {timeout} s; stderr:\n{process.stderr.read()}")
    return process.stdout.readline().strip()


def test_a_reused_message_id_never_acknowledges_an_unsent_result(broker, tmp_path):
    """Message ids wrap at 65,535: a result that gets the id of an earlier status or stats message must
    still wait for its own PUBACK. Network cut silently, publisher SIGKILLed, restarted: all arrive."""
    sub = Subscriber(broker.port)
    relay = Relay(broker.port)
    outbox = tmp_path / "outbox.db"
    child = subprocess.Popen([sys.executable, "-m", "tests.publishing_child", str(outbox), str(relay.port)], cwd=ROOT,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert _read_line(child, 30) == "ready"
        assert sub.wait_for(lambda: len(sub.payloads("/wrap/stats")) == 3, 10)
        relay.cut.set()
        child.stdin.write("store 6\n")
        child.stdin.flush()
        word, *stored = _read_line(child, 10).split()
        assert word == "stored" and len(stored) == 6
        sent = 6 * len(TOPIC + json.dumps({"message_id": stored[0]}))  # topics and payloads, without headers
        assert sub.wait_for(lambda: relay.swallowed >= sent, 10), "the results were not all sent into the cut"
        child.stdin.write("flush\n")  # the publisher looks at what was acknowledged now, instead of after a pause
        child.stdin.flush()
        assert _read_line(child, 10) == "pending 6", "a result was taken as acknowledged through the cut"
    finally:
        child.kill()
        child.wait()
        relay.close()
    box = Outbox(outbox)
    publisher = Publisher(MQTTConfig(host="127.0.0.1", port=broker.port), box, "wrap")
    publisher.start()
    try:
        assert publisher.wait_drained(timeout=15)
    finally:
        publisher.stop()
        box.close()
    assert sub.wait_for(lambda: set(stored) <= set(sub.results()), 10), \
        f"{len(set(stored) - set(sub.results()))} of 6 stored results never arrived"
    sub.close()


def test_a_result_whose_id_is_still_taken_is_sent_again_not_acknowledged(broker, tmp_path):
    """paho refuses a QoS 1 publish whose id an unacknowledged command reply still holds (after a wrap):
    that result was never sent, so the reply's PUBACK must not delete it. Broker paused with SIGSTOP."""
    sub = Subscriber(broker.port)
    box = Outbox(tmp_path / "outbox.db")
    publisher = Publisher(MQTTConfig(host="127.0.0.1", port=broker.port), box, "taken")
    publisher.start()
    try:
        assert publisher.connected.wait(10)
        broker.process.send_signal(signal.SIGSTOP)
        try:
            publisher.publish_now(publisher.topics.reply("ping"), b"{}")  # waits for a PUBACK that cannot come yet
            publisher.client._last_mid -= 1  # the next publish, a result, gets the reply's id
            message_id = "00000000-0000-4000-8000-000000000001"
            box.put("leukoscope/taken/results", json.dumps({"message_id": message_id}).encode())
            publisher.notify()
            assert wait_for(lambda: publisher.inflight() == 1, 5)  # the publisher has tried it
        finally:
            broker.process.send_signal(signal.SIGCONT)
        assert publisher.wait_drained(timeout=10)
    finally:
        publisher.stop()
        box.close()
    assert sub.wait_for(lambda: message_id in sub.results(), 5), "the result left the outbox without being delivered"
    sub.close()


def test_a_connection_lost_in_the_middle_of_a_batch_stalls_nothing(broker, tmp_path):
    """Results published just after the connection died (paho: 'not currently connected') are sent
    again after the reconnect; the backlog still drains and every result arrives."""
    sub = Subscriber(broker.port)
    relay = Relay(broker.port)
    box = Outbox(tmp_path / "outbox.db")
    stored = [str(uuid.uuid4()) for _ in range(3000)]
    for message_id in stored:
        box.put("leukoscope/batch/results", json.dumps({"message_id": message_id}).encode())
    publisher = Publisher(MQTTConfig(host="127.0.0.1", port=relay.port, max_inflight=len(stored)), box, "batch")
    publisher.start()
    try:
        assert wait_for(lambda: publisher.inflight() > 0, 10)  # one batch of 3000 publishes has begun
        relay.cut.set()  # no more PUBACKs to read first: the publisher sees the end of the connection at once
        relay.drop()
        relay.cut.clear()
        assert publisher.wait_drained(timeout=20), f"{len(box)} results stuck in the outbox"
    finally:
        publisher.stop()
        box.close()
        relay.close()
    assert sub.wait_for(lambda: set(stored) <= set(sub.results()), 10)
    sub.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread this test kills
def test_a_dead_sending_thread_stops_the_agent_for_a_restart(broker, tmp_path):
    """Analysing on while nothing is delivered would only fill the outbox: the agent exits 1 instead,
    and systemd (Restart=on-failure) starts a fresh one. The fault: the outbox cannot be read."""
    agent = edge.agent.Agent(parse_config({
        "source": {"type": "folder", "path": str(ROOT / "samples" / "frames"), "loop": True, "fps": 20},
        "segmentation": {"um_per_px": 0.083},
        "mqtt": {"host": "127.0.0.1", "port": broker.port}, "outbox": {"path": str(tmp_path / "outbox.db")}}))

    def unreadable(limit: int = 100, after: int = 0) -> list:
        raise sqlite3.OperationalError("disk I/O error")

    agent.outbox.pending = unreadable  # type: ignore[method-assign]
    timer = threading.Timer(30, agent.stop_event.set)  # a bound, should it not stop by itself
    timer.start()
    try:
        assert agent.run() == 1
    finally:
        timer.cancel()


def test_a_command_sent_the_moment_a_device_shows_online_is_not_lost(broker, tmp_path):
    """`quantize publish` sends as soon as it sees a device "online", so the device says so only once the
    broker has acknowledged its command subscription (before, "online" went first, and a command sent at
    once could reach the broker before the subscription and be dropped: seen under load)."""
    box = Outbox(tmp_path / "outbox.db")
    commands: list[str] = []
    publisher = Publisher(MQTTConfig(host="127.0.0.1", port=broker.port), box, "quick",
                          on_command=lambda topic, payload: commands.append(topic))
    events: list[str] = []
    client = publisher.client
    subscribe, publish, acknowledged = client.subscribe, client.publish, client.on_subscribe

    def logged_subscribe(*args, **kwargs):
        events.append("subscribe")
        return subscribe(*args, **kwargs)

    def logged_publish(topic, payload=None, *args, **kwargs):
        if topic == publisher.topics.status:
            events.append(f"status {payload.decode()}")
        return publish(topic, payload, *args, **kwargs)

    def logged_suback(*args) -> None:
        events.append("suback")
        acknowledged(*args)

    client.subscribe, client.publish, client.on_subscribe = logged_subscribe, logged_publish, logged_suback
    watching = threading.Event()

    def on_message(client, userdata, message) -> None:
        if message.payload == b"online":
            client.publish(publisher.topics.command("ping"), b"{}", qos=1)

    watcher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="watcher")
    watcher.on_connect = lambda c, u, f, rc, p: c.subscribe(publisher.topics.status, qos=1)
    watcher.on_subscribe = lambda c, u, mid, rc, p: watching.set()
    watcher.on_message = on_message
    watcher.connect("127.0.0.1", broker.port)
    watcher.loop_start()
    try:
        assert watching.wait(10)
        publisher.start()
        assert wait_for(lambda: commands == [publisher.topics.command("ping")], 5), commands
        assert events[:3] == ["subscribe", "suback", "status online"], events
    finally:
        publisher.stop()
        watcher.disconnect()
        watcher.loop_stop()
        box.close()


def test_last_will_marks_the_device_offline(broker, frames, tmp_path):
    sub = Subscriber(broker.port, topic="leukoscope/+/status")
    agent = start_agent(write_config(tmp_path / "a.toml", port=broker.port, frames=frames, outbox=tmp_path / "o.db",
                                     fps=5, loop=True))
    assert sub.wait_for(lambda: b"online" in sub.payloads("/status"), 30)
    agent.send_signal(signal.SIGKILL)  # no goodbye: only the broker's last will can say it
    agent.wait()
    assert sub.wait_for(lambda: sub.payloads("/status")[-1] == b"offline", 15)
    sub.close()


def test_malformed_commands_are_answered_not_fatal(broker, frames, tmp_path):
    agent = start_agent(write_config(tmp_path / "a.toml", port=broker.port, frames=frames, outbox=tmp_path / "o.db",
                                     fps=5, loop=True))
    sub = Subscriber(broker.port, topic="leukoscope/t1/reply/#", client_id="replies")
    base = "leukoscope/t1/cmd/"
    assert sub.wait_for(lambda: _ping(broker.port, base, sub, "warm-up"), 30)
    rng = random.Random(7)
    sender = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="fuzzer")
    sender.connect("127.0.0.1", broker.port)
    sender.loop_start()
    names = ["ping", "start_sample", "stop_sample", "snapshot", "reload_model", "", "x" * 300, "ünïcode", "a/b/c"]
    for _ in range(1000):
        kind = rng.randrange(6)
        if kind == 0:
            payload = bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
        elif kind == 1:
            payload = json.dumps(rng.choice([[], 1, "s", None, 3.5, {"sample_id": rng.randrange(10**6)}])).encode()
        elif kind == 2:
            payload = json.dumps({"sample_id": "".join(rng.choice("ab/#+ \n") for _ in range(rng.randrange(90)))}).encode()
        elif kind == 3:
            payload = json.dumps({"bundle": rng.choice(["/nonexistent", 5, "", "/etc"]), "reply_to": rng.choice(["x", 5, "#"])}).encode()
        elif kind == 4:
            payload = b"{" * rng.randrange(1, 2000)
        else:
            payload = json.dumps({"request_id": rng.randrange(99), "deep": [[[[]]]] * 50}).encode()
        sender.publish(base + rng.choice(names), payload, qos=rng.choice([0, 1]))
    sender.loop_stop()
    sender.disconnect()
    alive = sub.wait_for(lambda: _ping(broker.port, base, sub, "after-storm"), 60)
    if not alive:
        agent.kill()
        pytest.fail(f"no answer after the storm; agent log:\n{agent.log()[-3000:]}")
    assert agent.poll() is None, "the agent died"
    errors = [json.loads(p) for p in sub.payloads("") if not json.loads(p)["ok"]]
    assert errors and all(e["error"] for e in errors)
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(timeout=60) == 0, agent.log()[-3000:]
    sub.close()


def _ping(port: int, base: str, sub: Subscriber, request_id: str) -> bool:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"ping-{request_id}")
    client.connect("127.0.0.1", port)
    client.loop_start()
    client.publish(base + "ping", json.dumps({"request_id": request_id}).encode(), qos=1).wait_for_publish(5)
    client.loop_stop()
    client.disconnect()
    return sub.wait_for(lambda: any(json.loads(p).get("request_id") == request_id and json.loads(p)["ok"]
                                    for p in sub.payloads("/reply/ping")), 3)


def test_start_and_stop_sample_commands(broker, frames, tmp_path):
    agent = start_agent(write_config(tmp_path / "a.toml", port=broker.port, frames=frames, outbox=tmp_path / "o.db",
                                     fps=10, loop=True))
    sub = Subscriber(broker.port, client_id="samples")
    base = "leukoscope/t1/cmd/"
    assert sub.wait_for(lambda: _ping(broker.port, base, sub, "ready"), 30)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="operator")
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    client.publish(base + "start_sample", json.dumps({"sample_id": "BM-42"}).encode(), qos=1).wait_for_publish(5)
    assert sub.wait_for(lambda: any(r["sample_id"] == "BM-42" for r in sub.results().values()), 20)
    client.publish(base + "stop_sample", b"", qos=1).wait_for_publish(5)
    assert sub.wait_for(lambda: any(json.loads(p)["final"] for p in sub.payloads("/samples/BM-42")), 20)
    client.loop_stop()
    client.disconnect()
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(timeout=60) == 0
    sub.close()


def retained(port: int, topic: str = "leukoscope/#") -> list[tuple[str, bytes]]:
    """What the broker holds retained under ``topic``: it sends those right after the SUBACK, so a
    marker published after the subscription ends the wait (no sleep)."""
    got: list[tuple[str, bytes]] = []
    subscribed, marked = threading.Event(), threading.Event()
    marker = f"leukoscope/marker-{uuid.uuid4()}"

    def on_message(client, userdata, message) -> None:
        if message.topic == marker:
            marked.set()
        else:
            got.append((message.topic, message.payload))

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"retained-{uuid.uuid4()}")
    client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
    client.on_subscribe = lambda c, u, mid, rc, p: subscribed.set()
    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        assert subscribed.wait(10)
        client.publish(marker, b"end", qos=1)
        assert marked.wait(10)
    finally:
        client.disconnect()
        client.loop_stop()
    return got


def test_edge_check_leaves_nothing_behind(broker, frames, tmp_path):
    """A self-test creates no outbox (nor its folder) and leaves no retained status on the broker."""
    state = tmp_path / "state"
    config = write_config(tmp_path / "a.toml", port=broker.port, frames=frames, outbox=state / "outbox.db")
    check = subprocess.run([sys.executable, "-m", "edge.cli", "check", "--config", str(config)], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "ok   broker" in check.stdout and "ok   outbox" in check.stdout and "creates it" in check.stdout
    assert not state.exists(), list(state.rglob("*"))
    assert retained(broker.port) == []
    # An outbox that exists is checked where it is, and stays as it was.
    agent = start_agent(config)
    assert agent.wait(timeout=120) == 0, agent.log()
    before = sorted((p.name, p.stat().st_size) for p in state.iterdir())
    check = subprocess.run([sys.executable, "-m", "edge.cli", "check", "--config", str(config)], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and "exists" in check.stdout, check.stdout
    assert sorted((p.name, p.stat().st_size) for p in state.iterdir()) == before


@needs_mosquitto
def test_wrong_credentials_give_a_clear_message(tmp_path, frames):
    passwords = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), "scope", "right"], check=True, capture_output=True)
    passwords.chmod(0o600)
    broker = Broker(tmp_path / "broker", password_file=passwords).start()
    try:
        secret = tmp_path / "secret"
        secret.write_text("wrong\n")
        config = write_config(tmp_path / "a.toml", port=broker.port, frames=frames, outbox=tmp_path / "o.db",
                              extra=f'username = "scope"\npassword_file = "{secret}"')
        agent = start_agent(config)
        assert agent.wait(timeout=60) == 2
        err = agent.log()
        assert "refused the connection" in err and ("Not authorized" in err or "Bad user name or password" in err)
        assert "wrong" not in err  # the password is never logged
        check = subprocess.run([sys.executable, "-m", "edge.cli", "check", "--config", str(config)], cwd=ROOT,
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 1 and "FAIL broker" in check.stdout
        secret.write_text("right\n")
        check = subprocess.run([sys.executable, "-m", "edge.cli", "check", "--config", str(config)], cwd=ROOT,
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stdout
    finally:
        broker.stop()


def _certificates(folder: Path, name: str) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (folder / f"{name}-{n}" for n in ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt"))
    run = lambda *args: subprocess.run(["openssl", *args], check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca), "-days", "2", "-subj", f"/CN={name} test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")
    ext = folder / f"{name}-ext.cnf"
    ext.write_text("subjectAltName = IP:127.0.0.1\n")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial", "-out", str(cert),
        "-days", "2", "-extfile", str(ext))
    return {"ca": ca, "cert": cert, "key": key}


@needs_mosquitto
@pytest.mark.skipif(shutil.which("openssl") is None, reason="TLS test makes its certificates with openssl")
def test_tls_with_right_and_wrong_ca(tmp_path, frames):
    good = _certificates(tmp_path / "pki", "good")
    other = _certificates(tmp_path / "pki", "other")
    broker = Broker(tmp_path / "broker", tls=good).start()
    try:
        for ca, expected in ((good["ca"], 0), (other["ca"], 1)):
            config = write_config(tmp_path / "a.toml", port=broker.port, frames=frames, outbox=tmp_path / "o.db",
                                  extra=f'[mqtt.tls]\nca_file = "{ca}"')
            check = subprocess.run([sys.executable, "-m", "edge.cli", "check", "--config", str(config)], cwd=ROOT,
                                   capture_output=True, text=True, timeout=60)
            assert check.returncode == expected, check.stdout + check.stderr
            if expected:
                assert "FAIL broker" in check.stdout and "certificate verify failed" in check.stdout
        config = write_config(tmp_path / "b.toml", port=broker.port, frames=frames, outbox=tmp_path / "o.db",
                              extra=f'[mqtt.tls]\nca_file = "{tmp_path / "missing.crt"}"')
        agent = start_agent(config)
        assert agent.wait(timeout=60) == 2
        assert "certificate files cannot be loaded" in agent.log()
    finally:
        broker.stop()


def test_the_readme_local_broker_recipe_works(broker, tmp_path):
    """The README's recipe, as a newcomer runs it (its broker's port and outbox moved into the test's)."""
    import tomllib

    readme = (ROOT / "README.md").read_text()
    text = re.search(r"<<'TOML'\n(.*?)\nTOML\n", readme, re.S).group(1)
    config = tomllib.loads(text)
    assert config["source"] == {"type": "folder", "path": "samples/frames", "fps": 2} and "tls" not in config["mqtt"]
    text = text.replace("port = 1883", f"port = {broker.port}")
    text = text.replace("/tmp/leukoscope-outbox.sqlite3", str(tmp_path / "outbox.sqlite3"))
    path = tmp_path / "local.toml"
    path.write_text(text)
    sub = Subscriber(broker.port)
    check = subprocess.run([sys.executable, "-m", "edge.cli", "check", "--config", str(path)], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and check.stdout.count("ok   ") == 7 and "ok   scale 0.083" in check.stdout, \
        check.stdout + check.stderr
    agent = start_agent(path)
    assert agent.wait(timeout=120) == 0, agent.log()
    assert sub.wait_for(lambda: len(sub.results()) == 6 and b"offline" in sub.payloads("bench-01/status"), 10), \
        (len(sub.results()), sub.payloads("bench-01/status"), agent.log())
    assert json.loads(sub.payloads("bench-01/samples/BENCH-1")[-1])["final"]
    sub.close()
