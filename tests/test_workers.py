"""Frames analysed in worker processes (``pipeline.processes``): the same analysis as in the agent's own
threads, a worker that dies is started again with its frame reported, and a new bundle reaches them."""

import json
import os
import signal
import sqlite3

import numpy as np
import pytest

from edge.agent import Agent
from edge.calibration import read_scale_file
from edge.classifier import Classifier
from edge.config import parse_config
from edge.errors import UserError
from edge.pipeline import Pipeline
from edge.preprocessing import read_rgb
from edge.segmentation import SegmentationSettings
from edge.sources import Frame
from edge.workers import AnalysisProcesses
from tests.conftest import ROOT

FRAMES = ROOT / "samples" / "frames"
SAMPLE_UM_PER_PX = read_scale_file(FRAMES)


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    return Pipeline(Classifier(ROOT / "models" / "default", num_threads=1), SegmentationSettings(um_per_px=SAMPLE_UM_PER_PX))


@pytest.fixture
def processes(pipeline):
    workers = AnalysisProcesses(pipeline, 2)
    yield workers
    workers.close()


def _frames() -> list[Frame]:
    return [Frame(read_rgb(path), path.name) for path in sorted(FRAMES.glob("*.jpg"))]


def test_worker_processes_analyse_a_frame_as_the_pipeline_does(pipeline, processes):
    for frame in _frames():
        here, there = pipeline.analyse(frame), processes.analyse(frame)
        assert there.frame is frame
        assert [c.bbox for c in there.found] == [c.bbox for c in here.found] and there.found
        assert all(np.array_equal(a.mask, b.mask) for a, b in zip(there.found, here.found))
        assert there.verdicts == here.verdicts
        assert [c.bbox for c in there.cells] == [c.bbox for c in here.cells]
        assert np.array_equal(there.crops, here.crops)
        assert np.array_equal(there.scores, here.scores) and there.labels == here.labels
        assert there.bundle == here.bundle
        varies = {"timings_ms": None, "message_id": None}  # how long it took, and a fresh id per result
        assert pipeline.result(there) | varies == pipeline.result(here) | varies


def test_a_worker_that_dies_is_started_again_and_its_frame_reported(processes):
    frame = _frames()[0]
    assert processes.analyse(frame).found
    for pid in processes.pids():
        os.kill(pid, signal.SIGKILL)
    for _ in range(2):  # each worker's next frame finds it gone
        with pytest.raises(UserError, match=r"analysis worker \d exited \(exit code -9\) and was started again; "
                                            "this frame was not analysed"):
            processes.analyse(frame)
    for _ in range(2):
        assert processes.analyse(frame).found
    assert len(set(processes.pids())) == 2


def test_workers_outlive_the_stop_signal_until_the_caller_stops_them(processes):
    """systemd's SIGTERM reaches every process of the service: the workers finish what the agent hands them,
    signalled here the moment they were started (they ignore it from birth, inherited from their fork server)."""
    frame = _frames()[0]
    pids = processes.pids()
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGINT)
    for _ in range(2):
        assert processes.analyse(frame).found
    assert processes.pids() == pids
    processes.close()
    assert not any(os.path.exists(f"/proc/{pid}") for pid in pids)
    processes.close()  # again: nothing to do


def test_a_frame_the_pipeline_refuses_is_one_line_from_the_worker(processes):
    frame = _frames()[0]
    for refused in (np.zeros((0, 0, 3), np.uint8), frame.image[..., 1]):  # no pixels; one channel
        for _ in range(2):  # each worker
            with pytest.raises(UserError, match="empty frame") as caught:
                processes.analyse(Frame(refused, "refused.png"))
            assert "\n" not in str(caught.value)
    larger = np.pad(frame.image, ((0, 200), (0, 200), (0, 0)), mode="edge")  # a frame that needs a larger buffer
    for _ in range(2):  # and the workers go on
        assert processes.analyse(Frame(larger, "larger.png")).found


def test_a_new_bundle_reaches_the_workers(pipeline, processes, tiny_bundle):
    frame = _frames()[0]
    default = processes.analyse(frame).bundle
    processes.use(tiny_bundle)
    for _ in range(2):  # each worker loads it before its next frame
        assert processes.analyse(frame).bundle == Classifier(tiny_bundle, splitter=False).bundle.id != default


def test_the_agent_with_worker_processes_keeps_every_result_in_order(tmp_path):
    def run(processes: bool) -> list[dict]:
        outbox = tmp_path / f"outbox-{processes}.sqlite3"
        agent = Agent(parse_config({
            "source": {"type": "folder", "path": str(FRAMES)}, "segmentation": {"um_per_px": SAMPLE_UM_PER_PX},
            "mqtt": {"enabled": False}, "outbox": {"path": str(outbox)},
            "pipeline": {"workers": 2, "processes": processes, "sample_id": "S9"}}))
        seen: list[int] = []

        class Pids:  # the workers' pids while they run
            def analysed(self, done) -> None:
                seen.extend([] if seen or not agent.analysers else agent.analysers.pids())

            def skipped(self, frame, reason) -> None:
                pass

        agent.step.observers.append(Pids())
        assert agent.run() == 0
        assert len(seen) == (2 if processes else 0)
        assert not any(os.path.exists(f"/proc/{pid}") for pid in seen)  # stopped with the agent
        with sqlite3.connect(outbox) as db:
            rows = db.execute("SELECT topic, payload FROM outbox ORDER BY id").fetchall()
        return [json.loads(p) for t, p in rows if t.endswith("/results")]

    threads, processes = run(False), run(True)
    assert [r["sequence"] for r in processes] == list(range(1, len(sorted(FRAMES.glob("*.jpg"))) + 1))
    same = ("source", "cells", "unclassified", "focus", "counts", "bundle")
    assert [{k: r[k] for k in same} for r in processes] == [{k: r[k] for k in same} for r in threads]


def test_worker_processes_do_not_share_an_edge_tpu():
    with pytest.raises(UserError, match="pipeline.processes: one Edge TPU cannot be opened by several processes") as caught:
        parse_config({"source": {"type": "folder", "path": "/f"}, "classifier": {"edgetpu": True},
                      "pipeline": {"processes": True}})
    assert "\n" not in str(caught.value)


def test_replay_with_worker_processes_prints_the_same_results(capsys):
    from edge.cli import main

    def replay(*extra: str) -> list[dict]:
        assert main(["replay", "--source", str(FRAMES), "--json", *extra]) == 0
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        varies = ("message_id", "run_id", "time", "started", "timings_ms")  # ids, clocks and durations
        return [{k: v for k, v in line.items() if k not in varies} for line in lines]

    threads = replay()
    assert replay("--processes") == threads and len(threads) == len(sorted(FRAMES.glob("*.jpg"))) + 1  # + the summary


def test_no_shared_memory_is_one_line_naming_the_fix(processes, monkeypatch):
    import edge.workers

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(edge.workers, "SharedMemory", full)  # /dev/shm full: nothing else makes it fail on demand
    with pytest.raises(UserError, match=r"no shared memory for analysis worker \d \(\[Errno 28\] No space left on device\); "
                                        "free /dev/shm or set pipeline.processes = false"):
        processes.analyse(_frames()[0])


def test_edge_check_starts_the_worker_processes_and_says_so(tmp_path, capsys, monkeypatch):
    """`edge check` (the service's ExecStartPre) starts the workers where the agent will, and each analyses a frame."""
    import edge.workers
    from edge.cli import main

    config = tmp_path / "agent.toml"
    config.write_text(f'[source]\ntype = "folder"\npath = "{FRAMES}"\n[segmentation]\num_per_px = {SAMPLE_UM_PER_PX}\n'
                      f'[pipeline]\nprocesses = true\n[mqtt]\nenabled = false\n[outbox]\npath = "{tmp_path / "o.db"}"\n')
    assert main(["check", "--config", str(config)]) == 0
    assert "ok   worker processes 2 started, each analysed a frame (1 cells)" in capsys.readouterr().out

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(edge.workers, "SharedMemory", full)
    assert main(["check", "--config", str(config)]) == 1
    fails = [line for line in capsys.readouterr().out.splitlines() if line.startswith("FAIL")]
    assert fails == ["FAIL worker processes: no shared memory for analysis worker 0 ([Errno 28] No space left on device); "
                     "free /dev/shm or set pipeline.processes = false"]
