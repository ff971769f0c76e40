"""``edge demo``: the whole device on bundled sample frames, no camera, no root, no broker needed.

The agent runs exactly as in service, with a folder replay as its camera. Where a ``mosquitto``
binary exists, a private broker is started on a free loopback port and a real subscriber
prints the messages as they arrive; without one, results still go to the durable outbox and
the terminal.
"""

from __future__ import annotations

import csv
import json
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from edge import DISCLAIMER, in_words
from edge.agent import Agent
from edge.calibration import frames_scale
from edge.config import parse_config
from edge.sources import Frame
from edge.step import Analysed
from edge.topics import DEFAULT_PREFIX, Topics

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples" / "frames"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_broker(workdir: Path) -> tuple[subprocess.Popen, int] | None:
    binary = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if not binary:
        return None
    port = _free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    process = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return process, port
        time.sleep(0.05)
    process.terminate()
    return None


def _subscriber(port: int, topics: Topics, seen: list[tuple[str, str]]):
    """A real subscriber to every topic under the configured prefix; ``seen`` gets (kind, line) as they arrive."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    def on_message(client, userdata, message):
        kind = topics.kind(message.topic)
        try:
            body = json.loads(message.payload)
        except ValueError:
            body = message.payload.decode(errors="replace")
        if kind == "results":
            text = f"{body['source']}: {body['counts']['cells']} cells, {body['counts']['blasts']} flagged"
        elif kind == "samples":
            text = f"sample {body['sample_id']}: {body['cells']} cells, {body['blasts']} flagged" + (" (final)" if body["final"] else "")
        elif kind == "stats":
            return
        else:
            text = str(body)
        line = f"  [subscriber] {message.topic}  {text}"
        seen.append((kind or "other", line))
        print(line, flush=True)

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="leukoscope-demo-subscriber")
    client.on_connect = lambda c, u, f, rc, p: c.subscribe(topics.everything(), qos=1)
    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


def _iou(a, b) -> float:
    w = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    h = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return w * h / (a[2] * a[3] + b[2] * b[3] - w * h)


def _known_labels(results: list[dict], labels_csv: Path) -> list[tuple[str, str, str, float | None]]:
    """(frame, true label, predicted label or 'not found', p_all) for each composed cell of known label."""
    if not labels_csv.is_file():
        return []
    by_frame = {r["source"]: r for r in results}
    rows = []
    with labels_csv.open() as handle:
        for row in csv.DictReader(handle):
            box = [int(row[k]) for k in ("x", "y", "width", "height")]
            cells = by_frame.get(row["frame"], {"cells": []})["cells"]
            match = max(cells, key=lambda c: _iou(c["bbox"], box), default=None)
            if match is None or _iou(match["bbox"], box) < 0.3:
                rows.append((row["frame"], row["label"], "not found", None))
            else:
                rows.append((row["frame"], row["label"], match["label"], match["p_all"]))
    return rows


def demo_config(workdir: Path, frames: Path, bundle: Path | None, broker_port: int | None,
                topic_prefix: str = DEFAULT_PREFIX) -> dict:
    """The agent's config for the demo: the frames' own scale (their leukoscope-scale.json, as `edge
    replay` reads it, so both make the same crops), a local broker if one runs, everything annotated."""
    config = {
        "device": {"id": "demo-scope"},
        "source": {"type": "folder", "path": str(frames)},
        "segmentation": {"um_per_px": frames_scale(frames, None)},
        "mqtt": {"enabled": broker_port is not None, "host": "127.0.0.1", "port": broker_port or 1883, "stats_interval_s": 60,
                 "topic_prefix": topic_prefix},
        "outbox": {"path": str(workdir / "outbox.sqlite3")},
        "pipeline": {"sample_id": "DEMO-1", "log_results": True},
        "review": {"folder": str(workdir / "review"), "all_frames": True},
    }
    if bundle:
        config["classifier"] = {"bundle": str(bundle)}
    return config


class _Kept:
    """The demo's observer of the agent's frame step: the results as stored, for its summary."""

    def __init__(self) -> None:
        self.results: list[dict] = []

    def analysed(self, done: Analysed) -> None:
        if done.payload is not None:
            self.results.append(json.loads(done.payload))

    def skipped(self, frame: Frame, reason: str) -> None:
        pass


def run_demo(workdir: Path | None = None, frames: Path = SAMPLES, bundle: Path | None = None,
             topic_prefix: str = DEFAULT_PREFIX) -> int:
    workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="leukoscope-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"leukoscope demo: {DISCLAIMER}\nworking folder: {workdir}\n", flush=True)
    broker = _start_broker(workdir)
    config = parse_config(demo_config(workdir, frames, bundle, broker[1] if broker else None, topic_prefix), "demo config")
    seen: list[tuple[str, str]] = []
    subscriber = None
    if broker:
        print(f"mosquitto started on 127.0.0.1:{broker[1]}; a subscriber prints what arrives\n", flush=True)
        subscriber = _subscriber(broker[1], Topics(config.mqtt.topic_prefix, config.device.id), seen)
    else:
        print("no mosquitto found: results go to the durable outbox and this terminal only\n", flush=True)
    agent = Agent(config)
    kept = _Kept()
    agent.step.observers.append(kept)  # the demo also shows the results the agent stored
    try:
        agent.run()
        if subscriber:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not any(kind == "samples" and "(final)" in line for kind, line in seen):
                time.sleep(0.05)
    finally:
        if subscriber:
            subscriber.loop_stop()
            subscriber.disconnect()
        if broker:
            broker[0].terminate()
            broker[0].wait(timeout=10)
    _print_summary(kept.results, workdir, frames, delivered=sum(kind == "results" for kind, _ in seen) if broker else None)
    return 0


def _print_summary(results: list[dict], workdir: Path, frames: Path, delivered: int | None) -> None:
    cells = sum(r["counts"]["cells"] for r in results)
    blasts = sum(r["counts"]["blasts"] for r in results)
    print("\n=== demo summary ===")
    print(f"{len(results)} frames analysed, {cells} white cells found, {blasts} flagged as ALL blasts")
    if delivered is not None:
        print(f"{delivered} of {len(results)} frame results delivered through the broker to the subscriber")
    known = _known_labels(results, frames / "labels.csv")
    if known:
        right = sum(1 for _, truth, guess, _ in known if truth == guess)
        print(f"\ncomposed frames (real C-NMC cells of known label): {right} of {len(known)} cells classified as labelled")
        for frame, truth, guess, p in known:
            print(f"  {frame:<18} true {in_words(truth):<9} predicted {in_words(guess):<10}" + ("" if p is None else f" p(ALL) {p:.2f}"))
    print("\nThe BCCD frames are healthy blood from a lab the model never trained on: every white cell there is")
    print("normal. The model has never seen another lab's blasts (see models/default/MODEL_CARD.md).")
    print(f"\nannotated frames: {workdir / 'review'}\noutbox: {workdir / 'outbox.sqlite3'}\n{DISCLAIMER}")
