"""One frame's step, the same in the agent, ``edge replay`` and ``edge demo``: the pipeline, the
numbered result kept (outbox or stdout), the sample tally, then the observers.

What differs between the three is only where a result is kept (``Store``) and who watches
(``FrameObserver``): the agent's health counters, review frames and logs; replay's printing; the
demo's own summary. So a change to what a frame produces cannot reach one of them and miss another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

import numpy as np

from edge.errors import UserError
from edge.pipeline import Pipeline
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
    """pipeline -> kept, numbered result -> tally -> observers, for one frame at a time."""

    def __init__(self, pipeline: Pipeline, store: Store, observers: Iterable[FrameObserver] = ()) -> None:
        self.pipeline = pipeline
        self.store = store
        self.observers: list[FrameObserver] = list(observers)

    def __call__(self, frame: Frame, tally: SampleTally) -> Analysed | None:
        """Run one frame for ``tally``'s sample; the caller holds whatever lock guards the tally."""
        if frame.image is None:
            return self._skip(frame, tally, frame.error or "unreadable")
        try:
            result, cells, crops = self.pipeline.process(frame, tally.sample_id)
        except UserError as error:
            return self._skip(frame, tally, str(error))
        payload = self.store(result)
        tally.add(result)
        done = Analysed(frame, result, payload, cells, crops)
        for observer in self.observers:
            observer.analysed(done)
        return done

    def _skip(self, frame: Frame, tally: SampleTally, reason: str) -> None:
        tally.unreadable_frames += 1
        for observer in self.observers:
            observer.skipped(frame, reason)
        return None
