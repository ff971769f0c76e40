"""One per-frame step for the agent, `edge replay` and `edge demo`: what it keeps, counts and tells its
observers, in order, with an unreadable frame among readable ones."""

from __future__ import annotations

import json
import sys

import cv2

from edge.calibration import read_scale_file
from edge.classifier import Classifier
from edge.pipeline import Pipeline
from edge.results import SampleTally
from edge.segmentation import SegmentationSettings
from edge.sources import Frame
from edge.sources.folder import FolderSourceSettings, open_source
from edge.step import Analysed, FrameStep, count_from_one
from tests.conftest import ROOT

FRAMES = ROOT / "samples" / "frames"


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, object]] = []

    def analysed(self, done: Analysed) -> None:
        self.events.append(("analysed", done.frame.name, json.loads(done.payload)["sequence"]))

    def skipped(self, frame: Frame, reason: str) -> None:
        self.events.append(("skipped", frame.name, reason))


def test_the_step_numbers_keeps_tallies_and_tells_observers_in_order():
    pipeline = Pipeline(Classifier(ROOT / "models" / "default"), SegmentationSettings(um_per_px=read_scale_file(FRAMES)))
    frames = list(open_source(FolderSourceSettings(path=FRAMES)))[:3]
    frames.insert(1, Frame(image=None, name="broken.jpg", error="not an image"))
    first, second = Recorder(), Recorder()
    step = FrameStep(pipeline, count_from_one(), [first, second])
    tally = SampleTally("S1")
    done = [step(frame, tally) for frame in frames]
    assert done[1] is None and all(d is not None for d in done[:1] + done[2:])
    assert first.events == second.events == [("analysed", frames[0].name, 1), ("skipped", "broken.jpg", "not an image"),
                                             ("analysed", frames[2].name, 2), ("analysed", frames[3].name, 3)]
    assert tally.frames == 3 and tally.unreadable_frames == 1
    assert tally.cells == sum(d.result["counts"]["cells"] for d in done if d)
    assert all(d.result["sample_id"] == "S1" and d.payload == json.dumps(d.result).encode() for d in done if d)


def test_a_result_the_store_refuses_still_reaches_the_observers_as_refused():
    pipeline = Pipeline(Classifier(ROOT / "models" / "default"), SegmentationSettings(um_per_px=read_scale_file(FRAMES)))
    seen: list[Analysed] = []

    class Watch:
        def analysed(self, done: Analysed) -> None:
            seen.append(done)

        def skipped(self, frame: Frame, reason: str) -> None:
            raise AssertionError(reason)

    step = FrameStep(pipeline, lambda result: None, [Watch()])
    step(next(iter(open_source(FolderSourceSettings(path=FRAMES)))), SampleTally(None))
    assert len(seen) == 1 and seen[0].payload is None and seen[0].result["sample_id"] is None


def test_frames_analysed_at_once_come_out_in_order_with_the_same_results():
    """``in_order`` with 3 workers: a slow first frame, an unreadable one and a live source's "nothing
    new yet" (None) among them; the outcomes come in the frames' order, equal to one at a time."""
    import threading
    import time

    from edge.step import in_order

    pipeline = Pipeline(Classifier(ROOT / "models" / "default"), SegmentationSettings(um_per_px=read_scale_file(FRAMES)))
    step = FrameStep(pipeline, count_from_one())
    frames: list = list(open_source(FolderSourceSettings(path=FRAMES)))
    frames[2:2] = [Frame(image=None, name="broken.jpg", error="not an image"), None]
    threads: set[str] = set()
    opencv_threads: set[int] = set()
    switch_intervals: set[float] = set()
    before = cv2.getNumThreads(), sys.getswitchinterval()

    def analyse(frame: Frame):
        threads.add(threading.current_thread().name)
        opencv_threads.add(cv2.getNumThreads())
        switch_intervals.add(sys.getswitchinterval())
        if frame is frames[0]:
            time.sleep(0.3)  # the others finish first
        return step.analyse(frame)

    def names(outcomes) -> list[str]:
        return [o[0].name if isinstance(o, tuple) else o.frame.name for o in outcomes]

    together = list(in_order(analyse, frames, workers=3))
    alone = list(in_order(step.analyse, frames, workers=1))
    assert names(together) == names(alone) == [f.name for f in frames if f is not None]
    assert [o.scores.tolist() for o in together if not isinstance(o, tuple)] == \
           [o.scores.tolist() for o in alone if not isinstance(o, tuple)]
    assert len({t for t in threads if t.startswith("analyse")}) >= 2
    # Frames in parallel, each frame's OpenCV work on one thread (no contention for the same cores) and
    # Python's lock handed over every 1 ms; both settings are back afterwards.
    assert opencv_threads == {1} and switch_intervals == {0.001}
    assert (cv2.getNumThreads(), sys.getswitchinterval()) == before
