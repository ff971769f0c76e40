"""Result payloads and per-sample tallies: what subscribers code against.

Every payload carries ``schema`` and ``schema_version`` (documented as JSON Schema in
``edge/schemas/``) and a unique ``message_id``, so a subscriber can drop the duplicates that
QoS 1 may deliver after a reconnect. ``run_id`` names the run of the process that made it, and a
frame result's ``sequence`` is numbered by the outbox, persistently, so that a subscriber can tell a
restart (new ``run_id``, the sequence goes on) from a lost result (a gap in the sequence).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field

#: 2: frames carry ``unclassified`` cells (quality gate) and ``focus``; summaries the reasons.
#: 3: frames carry ``bundle`` (the id of the model bundle that scored them), summaries ``bundles``.
SCHEMA_VERSION = 3
FRAME_SCHEMA = "leukoscope/frame-result"
SAMPLE_SCHEMA = "leukoscope/sample-summary"
#: Made once per process start: every payload of this run of the agent carries it.
RUN_ID = str(uuid.uuid4())


def wilson_interval(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a proportion; sound at small counts and at 0 or 100%."""
    if total == 0:
        return 0.0, 1.0
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    spread = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - spread), min(1.0, centre + spread)


def light_problem(result: dict) -> str | None:
    """What kept a frame from showing cells (its result's ``light.problem``: dark, overexposed, no_colour), or None
    (none, or a result from a device older than ``light``)."""
    return (result.get("light") or {}).get("problem")


def frame_result(*, device_id: str, sample_id: str | None, source: str, cells: list[dict],
                 timings_ms: dict[str, float], captured_at: float, positive_label: str,
                 unclassified: list[dict] | None = None, focus: float | None = None, min_focus: float | None = None,
                 light: dict | None = None, bundle: str | None = None) -> dict:
    """One frame's payload, its ``sequence`` still None (see ``numbered``). ``cells`` were classified and
    are counted; ``unclassified`` were found but stopped by the quality gate (``reason``) and are not.
    ``focus``: the median nucleus focus, with ``out_of_focus`` when it is below ``min_focus``. ``light``: the frame's
    light and colour, and what kept it from showing cells (``gate.FrameLight.to_dict``)."""
    blasts = sum(1 for c in cells if c["label"] == positive_label)
    unclassified = unclassified or []
    return {
        "schema": FRAME_SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "message_id": str(uuid.uuid4()),
        "device_id": device_id,
        "run_id": RUN_ID,
        "sequence": None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(captured_at)) + f".{int(captured_at % 1 * 1000):03d}Z",
        "sample_id": sample_id,
        "source": source,
        "cells": cells,
        "unclassified": unclassified,
        "counts": {"cells": len(cells), "blasts": blasts, "unclassified": len(unclassified)},
        "focus": None if focus is None else round(focus, 1),
        "out_of_focus": focus is not None and min_focus is not None and focus < min_focus,
        **({"light": light} if light is not None else {}),
        "timings_ms": {k: round(v, 2) for k, v in timings_ms.items()},
        "bundle": bundle,
    }


def numbered(result: dict, sequence: int) -> bytes:
    """Fill in the result's ``sequence`` and serialise it.

    The agent calls this from ``Outbox.put_numbered``, inside the transaction that stores the result,
    so the number is the outbox's persistent one; ``edge replay`` (no outbox) numbers from 1 itself.
    """
    result["sequence"] = sequence
    return json.dumps(result).encode()


@dataclass
class SampleTally:
    sample_id: str | None
    started: float = field(default_factory=time.time)
    frames: int = 0
    cells: int = 0
    blasts: int = 0
    unreadable_frames: int = 0
    #: Found but not classified (quality gate), by reason: never part of cells or blasts.
    unclassified: dict[str, int] = field(default_factory=dict)
    out_of_focus_frames: int = 0
    #: Frames that could show no cells, by why (``gate.FRAME_PROBLEMS``: dark, overexposed, no colour).
    frame_problems: dict[str, int] = field(default_factory=dict)
    #: Ids of the model bundles that scored the sample's frames (two after an update mid-sample).
    bundles: set[str] = field(default_factory=set)

    def add(self, result: dict) -> None:
        self.frames += 1
        self.cells += result["counts"]["cells"]
        self.blasts += result["counts"]["blasts"]
        for cell in result.get("unclassified", []):
            self.unclassified[cell["reason"]] = self.unclassified.get(cell["reason"], 0) + 1
        self.out_of_focus_frames += bool(result.get("out_of_focus"))
        problem = light_problem(result)
        if problem:
            self.frame_problems[problem] = self.frame_problems.get(problem, 0) + 1
        if result.get("bundle"):
            self.bundles.add(result["bundle"])

    def summary(self, device_id: str, *, final: bool = False) -> dict:
        low, high = wilson_interval(self.blasts, self.cells)
        return {
            "schema": SAMPLE_SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "message_id": str(uuid.uuid4()),
            "device_id": device_id,
            "run_id": RUN_ID,
            "sample_id": self.sample_id,
            "final": final,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "frames": self.frames,
            "unreadable_frames": self.unreadable_frames,
            "cells": self.cells,
            "blasts": self.blasts,
            "unclassified": sum(self.unclassified.values()),
            "unclassified_reasons": dict(self.unclassified),
            "out_of_focus_frames": self.out_of_focus_frames,
            "frame_problems": dict(self.frame_problems),
            "blast_fraction": self.blasts / self.cells if self.cells else None,
            "blast_fraction_ci95": [low, high] if self.cells else None,
            "bundles": sorted(self.bundles),
        }
