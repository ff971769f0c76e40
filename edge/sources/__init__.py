"""Frame sources, one small plugin per kind, picked by the ``type`` key of ``[source]``.

Each plugin module holds its settings model and a ``open()`` that yields ``Frame``s. A source
that fails (a camera unplugged, a stream dropped) raises ``SourceLost``; ``resilient`` reopens
it with exponential backoff and reports, so a flaky cable is a log line, not a crash loop.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class Frame:
    image: np.ndarray | None  # RGB uint8; None when this frame could not be read
    name: str  # file name, or "<source>#<n>" for cameras
    timestamp: float = field(default_factory=time.time)
    error: str | None = None


HEALTHY_AFTER_S = 10.0


class SourceLost(Exception):
    """The source stopped delivering frames; reopening may help."""


def resilient(open_source: Callable[[], Iterator[Frame]], *, name: str, first_backoff: float = 1.0, max_backoff: float = 30.0,
              stop: Callable[[], bool] = lambda: False, on_failure: Callable[[str], None] = lambda reason: None) -> Iterator[Frame]:
    """Frames from ``open_source()``, reopening it with backoff (1, 2, 4 ... ``max_backoff`` s) when it fails.

    The backoff starts over only once a reopened source has worked for ``HEALTHY_AFTER_S``: a camera
    that dies right after each frame must not be reopened every second forever.
    """
    delay = first_backoff
    while not stop():
        opened = time.monotonic()
        try:
            for frame in open_source():
                if time.monotonic() - opened > HEALTHY_AFTER_S:
                    delay = first_backoff
                yield frame
                if stop():
                    return
            return  # a finite source (file replay) ended normally
        except SourceLost as error:
            on_failure(str(error))
            if stop():  # the caller gives up on the first failure (edge calibrate, edge check) and says why itself
                return
            log.error("%s: %s; reopening in %.0f s", name, error, delay)
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline and not stop():
            time.sleep(0.1)
        delay = min(delay * 2, max_backoff)
