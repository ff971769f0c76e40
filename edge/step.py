"""One frame's step, the same in the agent, ``edge replay`` and ``edge demo``: the pipeline, the
numbered result kept (outbox or stdout), the sample tally, then the observers. The agent analyses
several frames at once (``pipeline.workers``) and commits them one by one, in frame order.

What differs between the three is only where a result is kept (``Store``) and who watches
(``FrameObserver``): the agent's health counters, review frames and logs; replay's printing; the
demo's own summary. So a change to what a frame produces cannot reach one of them and miss another.
"""

from __future__ import annotations

import sys
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Protocol, TypeVar

import cv2
import numpy as np

from edge.errors import UserError
from edge.pipeline import Analysis, Pipeline
from edge.results import SampleTally, numbered
from edge.segmentation import Cell
from edge.sources import Frame

#: Numbers a result and keeps it; returns the payload as kept, or None when it could not be kept
#: (a full outbox refusing it). Called once per analysed frame, in order.
Store = Callable[[dict], bytes | None]


@dataclass(frozen=True)
class Analysed:
    """A frame through the step: its result (numbered), the payload as kept (None: refused), and the
    classified cells with their model inputs (for annotated frames and flagged crops)."""

    frame: Frame
    result: dict
    payload: bytes | None
    cells: list[Cell]
    crops: np.ndarray


class FrameObserver(Protocol):
    """Told about every frame, in order, after its result is kept."""

    def analysed(self, done: Analysed) -> None:
        """A frame was analysed and its result kept (or refused: ``done.payload is None``)."""

    def skipped(self, frame: Frame, reason: str) -> None:
        """A frame could not be analysed (unreadable, or refused by the pipeline): counted, not kept."""


def count_from_one() -> Store:
    """Numbering without an outbox (``edge replay``): 1, 2, 3 ... for this run only."""
    sequence = 0

    def store(result: dict) -> bytes:
        nonlocal sequence
        sequence += 1
        return numbered(result, sequence)

    return store


class FrameStep:
    """pipeline -> kept, numbered result -> tally -> observers, for one frame at a time.

    Two halves, so that several frames can be analysed at once: ``analyse`` (the pipeline; any thread,
    no lock) and ``commit`` (numbering, tally, observers; in frame order, under the caller's lock)."""

    def __init__(self, pipeline: Pipeline, store: Store, observers: Iterable[FrameObserver] = (),
                 analyser: Callable[[Frame], Analysis] | None = None) -> None:
        self.pipeline = pipeline
        self.store = store
        self.observers: list[FrameObserver] = list(observers)
        #: Who analyses a frame, when not the pipeline itself: worker processes running the same pipeline (edge.workers).
        self.analyser = analyser

    def __call__(self, frame: Frame, tally: SampleTally) -> Analysed | None:
        """Run one frame for ``tally``'s sample; the caller holds whatever lock guards the tally."""
        return self.commit(self.analyse(frame), tally)

    def analyse(self, frame: Frame) -> Analysis | tuple[Frame, str]:
        """The frame through the pipeline, or (frame, why it could not be analysed)."""
        if frame.image is None:
            return frame, frame.error or "unreadable"
        try:
            return self.analyser(frame) if self.analyser else self.pipeline.analyse(frame)
        except UserError as error:
            return frame, str(error)

    def commit(self, analysis: Analysis | tuple[Frame, str], tally: SampleTally) -> Analysed | None:
        """Number and keep the result for ``tally``'s sample, count it, tell the observers."""
        if isinstance(analysis, tuple):
            return self._skip(*analysis, tally)
        result = self.pipeline.result(analysis, tally.sample_id)
        payload = self.store(result)
        tally.add(result)
        done = Analysed(analysis.frame, result, payload, analysis.cells, analysis.crops)
        for observer in self.observers:
            observer.analysed(done)
        return done

    def _skip(self, frame: Frame, reason: str, tally: SampleTally) -> None:
        tally.unreadable_frames += 1
        for observer in self.observers:
            observer.skipped(frame, reason)
        return None


Outcome = TypeVar("Outcome")


def in_order(analyse: Callable[[Frame], Outcome], frames: Iterable[Frame | None], workers: int) -> Iterator[Outcome]:
    """``analyse`` over ``frames``, up to ``workers`` frames at once, the outcomes yielded in the frames'
    order. Segmentation, most of a frame's cost, runs in OpenCV outside Python's lock, so frames on two
    cores go 1.15-1.3x faster than one at a time (``benchmarks/bench_pipeline.py``). ``frames`` may yield
    None for "nothing new yet" (a live queue): finished outcomes are handed on meanwhile instead of
    waiting for the next frame."""
    if workers <= 1:
        yield from (analyse(frame) for frame in frames if frame is not None)
        return
    # Frames are the parallel unit now: OpenCV's own thread pool inside each frame would only contend
    # for the same cores (a 1080p frame cost 35 ms of CPU through the agent with it, 28 without).
    # A worker back from OpenCV waits for Python's lock until the other yields it, by default after
    # 5 ms: 1 ms keeps both cores busier (+5% frames/s at 1080p, measured).
    opencv_threads, switch_interval = cv2.getNumThreads(), sys.getswitchinterval()
    cv2.setNumThreads(1)
    sys.setswitchinterval(min(switch_interval, 0.001))
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="analyse") as pool:
            pending: deque[Future] = deque()
            for frame in frames:
                if frame is not None:
                    pending.append(pool.submit(analyse, frame))
                # One frame more than there are workers is handed over, so no worker waits while the
                # caller commits the oldest result (durable storage: ~2.6 ms a frame).
                while pending and (len(pending) > workers or pending[0].done()):
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
    finally:
        cv2.setNumThreads(opencv_threads)
        sys.setswitchinterval(switch_interval)
