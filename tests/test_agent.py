"""The agent in-process without a broker: the outbox keeps every result, and a camera faster than
inference drops the oldest frames, counted."""

import json
import sqlite3
import threading
import time

from edge.agent import Agent
from edge.calibration import read_scale_file
from edge.config import parse_config
from tests.conftest import ROOT

FRAMES = ROOT / "samples" / "frames"
SAMPLE_UM_PER_PX = read_scale_file(FRAMES)


def _agent(tmp_path, **source) -> Agent:
    return Agent(parse_config({
        "source": {"type": "folder", "path": str(FRAMES), **source},
        "segmentation": {"um_per_px": SAMPLE_UM_PER_PX},
        "mqtt": {"enabled": False},
        "outbox": {"path": str(tmp_path / "outbox.sqlite3")},
        "pipeline": {"queue_size": 1, "sample_id": "S9"},
    }))


def test_without_a_broker_every_result_waits_in_the_outbox(tmp_path):
    agent = _agent(tmp_path)
    assert agent.run() == 0
    frames = len([p for p in FRAMES.iterdir() if p.suffix == ".jpg"])
    with sqlite3.connect(tmp_path / "outbox.sqlite3") as db:
        rows = db.execute("SELECT topic, payload FROM outbox ORDER BY id").fetchall()
    results = [json.loads(p) for t, p in rows if t.endswith("/results")]
    assert [r["sequence"] for r in results] == list(range(1, frames + 1))
    bundle_id = agent.classifier.bundle.id  # every result names the bundle that scored it
    assert {r["bundle"] for r in results} == {bundle_id}
    assert rows[-1][0].endswith("/samples/S9") and json.loads(rows[-1][1])["final"] is True
    assert agent.counters["frames_dropped"] == 0


def test_a_camera_faster_than_inference_drops_the_oldest_frames_counted(tmp_path):
    agent = _agent(tmp_path, fps=1000.0, loop=True)
    agent.pipeline.analyse = _slow(agent.pipeline.analyse)  # inference slower than the camera
    _stop_when(agent, lambda c: c["frames_dropped"] > 0 and c["frames_processed"] >= 3)
    assert agent.run() == 0
    c = agent.counters
    assert c["frames_dropped"] > 0
    # At most the queue and the frames in hand (one per worker) were captured and neither dropped nor kept.
    assert c["frames_captured"] - c["frames_dropped"] - c["frames_processed"] <= 1 + agent.config.pipeline.workers


def test_frames_analysed_at_once_keep_their_order(tmp_path):
    """Three workers, and each frame takes a different time: later frames finish first, yet the
    results are numbered and kept in the order the frames came, and several really ran at once."""
    agent = Agent(parse_config({
        "source": {"type": "folder", "path": str(FRAMES)}, "segmentation": {"um_per_px": SAMPLE_UM_PER_PX},
        "mqtt": {"enabled": False}, "outbox": {"path": str(tmp_path / "outbox.sqlite3")},
        "pipeline": {"workers": 3, "sample_id": "S9"}}))
    analyse, running, most = agent.pipeline.analyse, [0], [0]
    lock = threading.Lock()

    def uneven(frame):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.15 if int(frame.name[-5]) % 2 else 0.01)  # odd-numbered files are slow
        try:
            return analyse(frame)
        finally:
            with lock:
                running[0] -= 1

    agent.pipeline.analyse = uneven
    assert agent.run() == 0
    with sqlite3.connect(tmp_path / "outbox.sqlite3") as db:
        rows = db.execute("SELECT topic, payload FROM outbox ORDER BY id").fetchall()
    results = [json.loads(p) for t, p in rows if t.endswith("/results")]
    names = sorted(p.name for p in FRAMES.iterdir() if p.suffix == ".jpg")
    assert [r["source"] for r in results] == names
    assert [r["sequence"] for r in results] == list(range(1, len(names) + 1))
    assert most[0] >= 2


def _stop_when(agent: Agent, condition, timeout: float = 60.0) -> threading.Thread:
    """Stop the agent as soon as ``condition(counters)`` holds (or after ``timeout``, as a bound)."""
    def watch() -> None:
        deadline = time.monotonic() + timeout
        while not condition(agent.counters) and time.monotonic() < deadline and not agent.stop_event.is_set():
            time.sleep(0.01)
        agent.stop_event.set()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _slow(process):
    def slower(*args, **kwargs):
        time.sleep(0.05)
        return process(*args, **kwargs)

    return slower


def test_a_vanishing_camera_is_reopened_with_backoff_and_reported():
    from edge.sources import Frame, SourceLost, resilient

    opened = []
    failures = []

    def flaky_camera():
        opened.append(time.monotonic())
        if len(opened) < 3:
            yield Frame(image=None, name=f"open{len(opened)}")
            raise SourceLost("camera 0 timed out")
        yield Frame(image=None, name="finally")

    names = [f.name for f in resilient(flaky_camera, name="camera", first_backoff=0.1, on_failure=failures.append)]
    assert names == ["open1", "open2", "finally"]
    assert failures == ["camera 0 timed out"] * 2
    gaps = [b - a for a, b in zip(opened, opened[1:])]
    assert gaps[0] >= 0.1 and gaps[1] >= 0.2  # backoff doubles


def test_systemd_notify_ready_watchdog_stopping(tmp_path, monkeypatch):
    import os
    import socket

    address = str(tmp_path / "notify.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(address)
    server.settimeout(0.1)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    messages: list[str] = []
    done = threading.Event()

    def receive() -> None:  # like systemd: read as they come
        while not done.is_set():
            try:
                messages.append(server.recv(256).decode())
            except socket.timeout:
                continue

    reader = threading.Thread(target=receive)
    reader.start()
    agent = _agent(tmp_path, fps=20.0, loop=True)
    _stop_when(agent, lambda c: messages.count("WATCHDOG=1") >= 3)
    try:
        assert agent.run() == 0
        deadline = time.monotonic() + 10  # the datagrams are sent; wait until the reader has them all
        while "STOPPING=1" not in messages and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        done.set()
        reader.join()
    assert messages[0] == "READY=1"
    assert messages.count("WATCHDOG=1") >= 3  # every 0.1 s while frames are analysed
    assert messages[-1] == "STOPPING=1"


def test_dark_frames_are_counted_and_warned_about_once(tmp_path, caplog):
    """The lamp off: frames with no light find no cells, and the agent says why (once, not every frame),
    counts them in stats, and says so again when light is back. The sample frames are real smears."""
    import logging
    import shutil

    import cv2
    import numpy as np

    from edge.gate import look_at

    folder = tmp_path / "frames"
    folder.mkdir()
    smears = sorted(FRAMES.glob("*.jpg"))[:2]
    rng = np.random.default_rng(0)
    for i in range(3):  # sensor noise on a shut light path, then the sample frames
        cv2.imwrite(str(folder / f"a_dark_{i}.png"), np.clip(rng.normal(8, 6, (480, 640, 3)), 0, 255).astype(np.uint8))
    for path in smears:
        shutil.copy(path, folder / f"b_{path.name}")
    assert all(look_at(cv2.imread(str(p))).brightest > 150 for p in smears)
    agent = _agent(tmp_path, path=str(folder))
    with caplog.at_level(logging.INFO, logger="edge.agent"):
        assert agent.run() == 0
    dark_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("frames are dark")]
    assert len(dark_lines) == 1 and "a_dark_0.png" in dark_lines[0] and "lamp" in dark_lines[0]
    assert any(r.getMessage().startswith("light is back at b_") for r in caplog.records)
    assert agent.counters["frames_dark"] == 3 and agent.frame_problem is None  # stats carries both (its schema requires them)


def test_frames_without_colour_or_overexposed_are_counted_and_warned_about_once(tmp_path, caplog):
    """A monochrome camera (or a colour one delivering greyscale): real smears, lit and in focus, but nuclei are
    found by their stain's colour, so no cells. The agent says why once, counts the frames, and says when
    colour is back. Dark frames are not called colourless: their warning is the lamp's. Real smears brightened as
    a lamp turned up under the fixed exposure (x1.7) lose their white cells: said too."""
    import logging

    import cv2
    import numpy as np

    from edge.gate import NO_COLOUR_LEVEL, look_at

    folder = tmp_path / "frames"
    folder.mkdir()
    smears = sorted(FRAMES.glob("*.jpg"))[:2]
    for i, path in enumerate(smears):
        grey = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2GRAY)
        cv2.imwrite(str(folder / f"a_grey_{i}.png"), cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR))
        cv2.imwrite(str(folder / f"b_colour_{i}.png"), cv2.imread(str(path)))
        cv2.imwrite(str(folder / f"d_bright_{i}.png"), np.clip(cv2.imread(str(path)) * 1.7, 0, 255).astype(np.uint8))
    cv2.imwrite(str(folder / "c_dark.png"), np.full((480, 640, 3), 6, np.uint8))
    assert all(look_at(cv2.imread(str(p))).colourful > 4 * NO_COLOUR_LEVEL for p in smears)
    agent = _agent(tmp_path, path=str(folder))
    with caplog.at_level(logging.INFO, logger="edge.agent"):
        assert agent.run() == 0
    lines = [r.getMessage() for r in caplog.records]
    warned = [line for line in lines if line.startswith("frames show no colour")]
    assert len(warned) == 1 and "a_grey_0.png" in warned[0] and "colour camera" in warned[0], warned
    assert any(line.startswith("colour is back at b_colour_0.png") for line in lines)
    bright = [line for line in lines if line.startswith("frames are overexposed")]
    assert len(bright) == 1 and "d_bright_0.png" in bright[0] and "exposure_us" in bright[0], bright
    assert agent.counters["frames_no_colour"] == 2 and agent.counters["frames_dark"] == 1
    assert agent.counters["frames_overexposed"] == 2 and agent.frame_problem == "overexposed"


def test_edge_check_fails_a_camera_without_colour_and_notes_dark_frames(tmp_path, capsys):
    """`edge check` (the service's ExecStartPre) on the source's first frames: greyscale ones fail in one line (a
    monochrome camera never works); dark ones are a note, not a failure (a lamp off at boot must not keep the
    service from starting); real colour frames pass, and where a lamp off-centre lights them unevenly, it says so."""
    import cv2
    import numpy as np

    from benchmarks.bench_robustness import uneven
    from edge.cli import main

    smears = sorted(FRAMES.glob("*.jpg"))[:3]

    def check(kind: str) -> tuple[int, list[str]]:
        folder = tmp_path / kind
        folder.mkdir()
        for i, path in enumerate(smears):
            image = cv2.imread(str(path))
            if kind == "grey":
                image = cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
            elif kind == "dark":
                image = np.full_like(image, 5)
            elif kind == "uneven":
                image = uneven(0.55, (0.3, 0.2))(image)
            cv2.imwrite(str(folder / f"{i}.png"), image)
        config = tmp_path / f"{kind}.toml"
        config.write_text(f'[source]\ntype = "folder"\npath = "{folder}"\n[segmentation]\num_per_px = {SAMPLE_UM_PER_PX}\n'
                          f'[mqtt]\nenabled = false\n[outbox]\npath = "{tmp_path / "o.db"}"\n')
        status = main(["check", "--config", str(config)])
        return status, [line for line in capsys.readouterr().out.splitlines() if line.startswith(("ok   light", "note light", "FAIL"))]

    status, lines = check("colour")
    assert status == 0 and len(lines) == 1 and lines[0].startswith("ok   light: brightest 1% at"), lines
    assert "uneven" not in lines[0]
    status, lines = check("uneven")  # a lamp off-centre: cells are still found, and the engineer is told
    assert status == 0 and len(lines) == 1 and "uneven across the frame (dimmest" in lines[0] and "Koehler" in lines[0], lines
    status, lines = check("grey")
    assert status == 1 and lines == ["FAIL camera: frames show no colour: the first of 3, most colourful 1% at 0 of 255 (below 16); "
                                     "is it a colour camera, delivering colour frames (not greyscale)?"]
    status, lines = check("dark")
    assert status == 0 and len(lines) == 1 and lines[0].startswith("note light: frames are dark: frame 1 of 3") and "lamp" in lines[0]
