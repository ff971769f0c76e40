"""One frame in, one result out: segment, crop in the training distribution, classify.

The model is the slow part per cell and the segmentation per frame; both are timed per
stage in every result so a slow device shows where its time goes.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from edge import in_words
from edge.classifier import Classifier
from edge.gate import MIN_FOCUS, FrameLight, Verdict, frame_focus, judge, look_at
from edge.preprocessing import crop_cell
from edge.results import frame_result
from edge.segmentation import Cell, SegmentationSettings, find_cells
from edge.sources import Frame

log = logging.getLogger(__name__)
#: Box colours of annotated frames (BGR): flagged blast, other classified cell, not classified.
FLAGGED_COLOUR, NORMAL_COLOUR, UNCLASSIFIED_COLOUR = (40, 40, 230), (60, 170, 60), (150, 150, 150)


class Pipeline:
    def __init__(self, classifier: Classifier, segmentation: SegmentationSettings = SegmentationSettings(),
                 device_id: str = "replay") -> None:
        self.classifier = classifier
        self.segmentation = segmentation
        self.device_id = device_id
        segmentation.diameter()  # the frame scale must be known: one line now, not at the first frame
        self.um_per_px = float(segmentation.um_per_px)  # type: ignore[arg-type]

    def crops(self, image: np.ndarray, cells: list[Cell], classifier: Classifier | None = None) -> np.ndarray:
        """Model inputs by the bundle's crop contract, from the frame at its configured scale."""
        contract = (classifier or self.classifier).contract
        batch = np.empty((len(cells), contract.size, contract.size, 3), np.uint8)
        for i, cell in enumerate(cells):
            batch[i] = crop_cell(image, cell.mask, cell.bbox, self.um_per_px, contract)
        return batch

    def analyse(self, frame: Frame) -> "Analysis":
        """Segment, gate, crop and classify a readable frame. Safe to call for several frames at once
        (``pipeline.workers``): it reads the pipeline's settings and changes nothing; the classifier
        serialises its own interpreter."""
        assert frame.image is not None
        classifier = self.classifier  # one model for the whole frame, even if another is installed meanwhile
        started = time.perf_counter()
        found = find_cells(frame.image, self.segmentation, classifier.splitter if self.segmentation.learned_split else None)
        light = look_at(frame.image)  # after find_cells, which refuses a frame without pixels in one line
        verdicts = [judge(frame.image, cell, self.um_per_px, self.segmentation) for cell in found]
        cells = [cell for cell, verdict in zip(found, verdicts) if verdict.classify]
        segmented = time.perf_counter()
        batch = self.crops(frame.image, cells, classifier)
        cropped = time.perf_counter()
        scores = classifier.scores(batch)
        classified = time.perf_counter()
        return Analysis(frame, light, found, verdicts, cells, batch, scores, classifier.labels(scores),
                        positive_label=classifier.bundle.positive_label, bundle=classifier.bundle.id,
                        # "segment" includes the frame's light and the quality gate.
                        timings_ms={"segment": 1000 * (segmented - started), "crop": 1000 * (cropped - segmented),
                                    "classify": 1000 * (classified - cropped), "total": 1000 * (classified - started)})

    def result(self, analysis: "Analysis", sample_id: str | None = None) -> dict:
        """The frame's result payload for ``sample_id``; the caller numbers it. Cells the quality gate
        stopped are reported under ``unclassified`` with their reason and never classified."""
        focus = {id(cell): verdict.focus for cell, verdict in zip(analysis.found, analysis.verdicts)}
        return frame_result(
            device_id=self.device_id, sample_id=sample_id, source=analysis.frame.name,
            cells=[{"bbox": list(cell.bbox), "area": cell.area, "p_all": round(float(score), 4), "label": label,
                    "focus": round(focus[id(cell)], 1)}
                   for cell, score, label in zip(analysis.cells, analysis.scores, analysis.labels)],
            unclassified=[{"bbox": list(cell.bbox), "area": cell.area, "reason": verdict.reason, "focus": round(verdict.focus, 1)}
                          for cell, verdict in zip(analysis.found, analysis.verdicts) if not verdict.classify],
            focus=frame_focus(analysis.verdicts), min_focus=MIN_FOCUS, light=analysis.light.to_dict(), timings_ms=analysis.timings_ms,
            captured_at=analysis.frame.timestamp, positive_label=analysis.positive_label, bundle=analysis.bundle,
        )

    def process(self, frame: Frame, sample_id: str | None = None) -> tuple[dict, list[Cell], np.ndarray]:
        """(result payload, cells classified, their model inputs) for a readable frame, in one call."""
        analysis = self.analyse(frame)
        return self.result(analysis, sample_id), analysis.cells, analysis.crops


@dataclass(frozen=True)
class Analysis:
    """What a frame showed, before it is part of a sample: every found cell with the gate's verdict,
    the classified ones with their model inputs, scores and labels, and the model that scored them."""

    frame: Frame
    light: FrameLight
    found: list[Cell]
    verdicts: list[Verdict]
    cells: list[Cell]
    crops: np.ndarray
    scores: np.ndarray
    labels: list[str]
    positive_label: str
    bundle: str
    timings_ms: dict[str, float]


def annotate(image: np.ndarray, result: dict, positive_label: str) -> np.ndarray:
    """The frame (RGB) as a person should see it (BGR, for OpenCV's writers): a box and words on every
    cell, red for a flagged blast, green for another classified cell, grey with the reason for a cell
    the quality gate did not classify. One home for what saved review frames and the live page show."""
    canvas = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    thickness = max(2, image.shape[1] // 400)
    for cell in result["cells"]:
        x, y, w, h = cell["bbox"]
        colour = FLAGGED_COLOUR if cell["label"] == positive_label else NORMAL_COLOUR
        cv2.rectangle(canvas, (x, y), (x + w, y + h), colour, thickness)
        cv2.putText(canvas, f"{in_words(cell['label'])} {cell['p_all']:.2f}", (x, max(12, y - 6)), cv2.FONT_HERSHEY_SIMPLEX,
                    0.5 * thickness, colour, thickness)
    for cell in result.get("unclassified", []):  # stopped by the quality gate: grey, with the reason
        x, y, w, h = cell["bbox"]
        cv2.rectangle(canvas, (x, y), (x + w, y + h), UNCLASSIFIED_COLOUR, thickness)
        cv2.putText(canvas, f"not classified: {cell['reason']}", (x, max(12, y - 6)), cv2.FONT_HERSHEY_SIMPLEX,
                    0.5 * thickness, UNCLASSIFIED_COLOUR, thickness)
    return canvas


class ReviewWriter:
    """Annotated frames and flagged crops for a person to review, bounded on disk (oldest go first)."""

    def __init__(self, folder: Path, positive_label: str, max_files: int = 500) -> None:
        self.folder = folder
        self.positive_label = positive_label
        self.max_files = max_files
        (folder / "flagged").mkdir(parents=True, exist_ok=True)
        # What is on disk, oldest first: listed once here, then kept up to date as files are written.
        self._written = {f: deque(sorted((p for p in f.iterdir() if p.is_file()), key=lambda p: p.stat().st_mtime))
                         for f in (folder, folder / "flagged")}

    def write(self, image: np.ndarray, result: dict, crops: np.ndarray) -> Path:
        canvas = annotate(image, result, self.positive_label)
        prefix = f"{result['sequence']:06d}_" + Path(result["source"]).stem.replace("#", "_").replace(":", "_")
        for cell, crop in zip(result["cells"], crops):
            if cell["label"] == self.positive_label:
                x, y = cell["bbox"][:2]
                self._keep(self.folder / "flagged" / f"{prefix}_{x}_{y}.png", crop[..., ::-1])
        path = self.folder / f"{prefix}.jpg"
        self._keep(path, canvas, [cv2.IMWRITE_JPEG_QUALITY, 85])
        return path

    def _keep(self, path: Path, image: np.ndarray, params: list[int] | None = None) -> None:
        cv2.imwrite(str(path), image, params or [])
        written = self._written[path.parent]
        written.append(path)
        while len(written) > self.max_files:
            written.popleft().unlink(missing_ok=True)
