"""One frame in, one result out: segment, crop in the training distribution, classify.

The model is the slow part per cell and the segmentation per frame; both are timed per
stage in every result so a slow device shows where its time goes.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from pathlib import Path

import cv2
import numpy as np

from edge.classifier import Classifier
from edge.preprocessing import CNMC_CELL_FRACTION, crop_cell, to_model_input
from edge.results import frame_result
from edge.segmentation import Cell, SegmentationSettings, find_cells
from edge.sources import Frame

log = logging.getLogger(__name__)


class Pipeline:
    def __init__(self, classifier: Classifier, segmentation: SegmentationSettings = SegmentationSettings(),
                 device_id: str = "replay") -> None:
        self.classifier = classifier
        self.segmentation = segmentation
        self.device_id = device_id
        self.window = int(round(segmentation.diameter() / CNMC_CELL_FRACTION))

    def crops(self, image: np.ndarray, cells: list[Cell]) -> np.ndarray:
        size = self.classifier.size
        batch = np.empty((len(cells), size, size, 3), np.uint8)
        for i, cell in enumerate(cells):
            if cell.pre_cropped:  # already a C-NMC-style crop, centred by its maker: keep its framing
                x, y, w, h = cell.bbox
                kept = np.zeros_like(image)
                cv2.copyTo(image[y:y + h, x:x + w], cell.mask.view(np.uint8), kept[y:y + h, x:x + w])
                batch[i] = to_model_input(kept, size)
            else:
                batch[i] = crop_cell(image, cell.mask, cell.bbox, self.window, size)
        return batch

    def process(self, frame: Frame, sample_id: str | None = None) -> tuple[dict, list[Cell], np.ndarray]:
        """(result payload, cells found, model inputs) for a readable frame; the caller numbers the result."""
        assert frame.image is not None
        started = time.perf_counter()
        cells = find_cells(frame.image, self.segmentation)
        segmented = time.perf_counter()
        batch = self.crops(frame.image, cells)
        cropped = time.perf_counter()
        scores = self.classifier.scores(batch)
        classified = time.perf_counter()
        labels = self.classifier.labels(scores)
        result = frame_result(
            device_id=self.device_id, sample_id=sample_id, source=frame.name,
            cells=[{"bbox": list(cell.bbox), "area": cell.area, "p_all": round(float(score), 4), "label": label}
                   for cell, score, label in zip(cells, scores, labels)],
            timings_ms={"segment": 1000 * (segmented - started), "crop": 1000 * (cropped - segmented),
                        "classify": 1000 * (classified - cropped), "total": 1000 * (classified - started)},
            captured_at=frame.timestamp, positive_label=self.classifier.bundle.positive_label,
        )
        return result, cells, batch


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
        canvas = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        prefix = f"{result['sequence']:06d}_" + Path(result["source"]).stem.replace("#", "_").replace(":", "_")
        thickness = max(2, image.shape[1] // 400)
        for cell, crop in zip(result["cells"], crops):
            x, y, w, h = cell["bbox"]
            flagged = cell["label"] == self.positive_label
            colour = (40, 40, 230) if flagged else (60, 170, 60)
            cv2.rectangle(canvas, (x, y), (x + w, y + h), colour, thickness)
            cv2.putText(canvas, f"{cell['label']} {cell['p_all']:.2f}", (x, max(12, y - 6)), cv2.FONT_HERSHEY_SIMPLEX,
                        0.5 * thickness, colour, thickness)
            if flagged:
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
