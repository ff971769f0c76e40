"""Edge pipeline speed on this machine: segmentation per frame size, classification per frame with N
cells (batched vs one by one), frames per second through `edge replay`, and its peak RSS.

    python benchmarks/bench_pipeline.py [--bundle models/default] [--bccd ../shared/data/bccd]

Large frames are tiled from real BCCD frames at their native scale (so a 1920x1080 frame holds
~6-9 white cells and a 4056x3040 frame ~40), not upscaled; a denser 1080p frame, as crowded as the
issue's "~10 cells", is tiled from 480x360 windows centred on BCCD's white cells (``DENSE``). Prints
one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge.classifier import Classifier  # noqa: E402
from edge.config import interpreter_threads  # noqa: E402
from edge.pipeline import Pipeline  # noqa: E402
from edge.preprocessing import read_rgb  # noqa: E402
from edge.segmentation import SegmentationSettings, find_cells  # noqa: E402
from edge.sources import Frame  # noqa: E402
from trainer.crosslab import wbc_boxes  # noqa: E402

SIZES = {"640x480": (640, 480), "1920x1080": (1920, 1080), "4056x3040": (4056, 3040)}


def tiled(frames: list[np.ndarray], width: int, height: int) -> np.ndarray:
    """A ``width`` x ``height`` frame tiled from ``frames`` (all of one size) in turn, row by row, cut at its edges."""
    tile_height, tile_width = frames[0].shape[:2]
    columns = -(-width // tile_width)
    rows = [np.hstack([frames[(row * columns + column) % len(frames)] for column in range(columns)])
            for row in range(-(-height // tile_height))]
    return np.ascontiguousarray(np.vstack(rows)[:height, :width])


#: A 1080p frame as crowded as the issue's "~10 cells": 480x360 windows of BCCD frames, each centred on
#: the frame's one annotated white cell, tiled 4 x 3 (~11 classified cells a frame).
DENSE = "1920x1080 (~11 cells)"


def dense_frames(bccd: Path, count: int = 8) -> list[np.ndarray]:
    """``count`` 1080p frames tiled from windows centred on real BCCD white cells, at BCCD's own scale."""
    windows = []
    for xml in sorted((bccd / "Annotations").glob("*.xml"))[:80]:
        boxes = wbc_boxes(xml)
        if len(boxes) != 1:
            continue
        image = read_rgb(bccd / "JPEGImages" / f"{xml.stem}.jpg")
        x0, y0, x1, y1 = boxes[0]
        left = min(max(0, (x0 + x1) // 2 - 240), image.shape[1] - 480)
        top = min(max(0, (y0 + y1) // 2 - 180), image.shape[0] - 360)
        windows.append(image[top:top + 360, left:left + 480])
    return [tiled(windows[7 * k % len(windows):] + windows[:7 * k % len(windows)], 1920, 1080) for k in range(count)]


def timed(function, repeats: int) -> float:
    return timed_both(function, repeats)[0]


def timed_both(function, repeats: int) -> tuple[float, float]:
    """Median wall and CPU milliseconds (CPU: this process, all its threads). On a shared machine the
    wall time swings with the load; the CPU time is what the code costs."""
    function()
    walls, cpus = [], []
    for _ in range(repeats):
        started, cpu = time.perf_counter(), time.process_time()
        function()
        walls.append(time.perf_counter() - started)
        cpus.append(time.process_time() - cpu)
    return float(np.median(walls) * 1000), float(np.median(cpus) * 1000)


class _FirstFrame:
    """A frame observer noting when the first result was kept: frames/s are counted from there, so that
    starting up (loading the model, and with ``pipeline.processes`` starting the workers) does not count."""

    def __init__(self) -> None:
        self.at: float | None = None

    def analysed(self, done) -> None:
        self.at = self.at or time.monotonic()

    def skipped(self, frame, reason: str) -> None:
        pass


#: (report key, pipeline.workers, pipeline.processes)
AGENT_MODES = (("workers_1", 1, False), ("workers_2", 2, False), ("workers_2_processes", 2, True))


def agent_throughput(args: argparse.Namespace, sources: list[np.ndarray]) -> dict:
    """Frames per second (wall clock) through the whole agent: capture thread, queue, analysing threads
    (or worker processes), results numbered and stored durably in frame order, for each of ``AGENT_MODES``,
    alternated three times in this run. Frames come from memory as a camera delivers them (no file
    decoding); counted from the first result kept to the last."""
    import edge.agent
    from edge.agent import Agent
    from edge.config import parse_config

    out: dict = {}
    for name in ("1920x1080", DENSE, "4056x3040"):
        frames = dense_frames(args.bccd) if name == DENSE else \
            [tiled(sources[i:] + sources[:i], *SIZES[name]) for i in range(0, 24, 3)]
        count = 96 if frames[0].shape[1] < 2000 else 24  # ~1.5 s a run
        runs: dict[str, list[float]] = {key: [] for key, _, _ in AGENT_MODES}
        for _ in range(3):
            for key, workers, processes in AGENT_MODES:
                with tempfile.TemporaryDirectory() as work:
                    agent = Agent(parse_config({
                        "source": {"type": "folder", "path": str(ROOT / "samples" / "frames")},
                        "segmentation": {"um_per_px": args.um_per_px, "watch_scale_every": 0},
                        "classifier": {"bundle": str(args.bundle), "num_threads": args.threads},
                        "mqtt": {"enabled": False}, "outbox": {"path": f"{work}/outbox.sqlite3"},
                        "pipeline": {"workers": workers, "processes": processes, "sample_id": "BENCH"}}))
                    held = [Frame(frames[i % len(frames)], f"f{i}") for i in range(count)]
                    edge.agent.open_frames = lambda config, stop, failed: iter(held)  # the camera: frames in memory
                    first = _FirstFrame()
                    agent.step.observers.append(first)
                    agent.run()
                    assert first.at is not None
                    runs[key].append((agent.counters["frames_processed"] - 1) / (agent.last_progress - first.at))
        out[name] = {key: round(float(np.median(v)), 1) for key, v in runs.items()}
        out[name]["speedup"] = round(out[name]["workers_2"] / out[name]["workers_1"], 2)
        out[name]["processes_vs_threads"] = round(out[name]["workers_2_processes"] / out[name]["workers_2"], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=ROOT / "models" / "default")
    parser.add_argument("--bccd", type=Path, default=ROOT.parent / "shared" / "data" / "bccd")
    parser.add_argument("--threads", type=int, default=None,
                        help="interpreter threads per frame (default: the agent's, the cores each worker has)")
    parser.add_argument("--um-per-px", type=float, default=0.083, help="the frames' scale (BCCD: 0.083, measured by edge calibrate)")
    args = parser.parse_args()

    sources = [read_rgb(p) for p in sorted((args.bccd / "JPEGImages").glob("*.jpg"))[:60]]
    one_frame_threads = interpreter_threads(args.threads, workers=1)  # frames one at a time below
    classifier = Classifier(args.bundle, num_threads=one_frame_threads)
    settings = SegmentationSettings(um_per_px=args.um_per_px)
    pipeline = Pipeline(classifier, settings)
    report: dict = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads or "default"},
                    "segmentation_ms": {}, "pipeline": {},
                    "learned_splitter": classifier.splitter is not None}
    for name in [*SIZES, DENSE]:
        frames = dense_frames(args.bccd, 4) if name == DENSE else \
            [tiled(sources[i:] + sources[:i], *SIZES[name]) for i in range(0, 12, 3)]
        splitter = classifier.splitter  # the device's segmentation: the bundle's splitter, when it has one
        cells = np.mean([len(find_cells(f, settings, splitter)) for f in frames])
        seg = np.median([timed(lambda f=f: find_cells(f, settings, splitter), 5) for f in frames])
        both = [timed_both(lambda f=f: pipeline.process(Frame(f, "bench")), 5) for f in frames]
        total, cpu = np.median([b[0] for b in both]), np.median([b[1] for b in both])
        report["segmentation_ms"][name] = round(float(seg), 2)
        report["pipeline"][name] = {"cells_per_frame": round(float(cells), 1), "ms_per_frame": round(float(total), 2),
                                    "frames_per_s": round(1000 / float(total), 1), "cpu_ms_per_frame": round(float(cpu), 2)}

    report["agent_frames_per_s"] = agent_throughput(args, sources)

    crops = np.random.default_rng(0).integers(0, 256, (10, classifier.size, classifier.size, 3), dtype=np.uint8)
    batched = timed(lambda: classifier.scores(crops), 20)
    one = Classifier(args.bundle, num_threads=one_frame_threads, max_batch=1)
    single = timed(lambda: one.scores(crops), 20)
    report["classification_10_cells_ms"] = {"batched": round(batched, 2), "one_by_one": round(single, 2),
                                            "speedup": round(single / batched, 2)}

    with tempfile.TemporaryDirectory() as folder:
        for i in range(30):
            cv2.imwrite(f"{folder}/f{i:03d}.png", cv2.cvtColor(tiled(sources[i:] + sources[:i], 1920, 1080), cv2.COLOR_RGB2BGR))
        started = time.perf_counter()
        replay = subprocess.Popen([sys.executable, "-m", "edge.cli", "replay", "--bundle", str(args.bundle), "--source", folder,
                                   "--json", "--um-per-px", str(args.um_per_px)]
                                  + (["--num-threads", str(args.threads)] if args.threads else []), cwd=ROOT,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        peak_kb = 0
        while replay.poll() is None:  # VmHWM of the replay itself (a fork's inherited pages would inflate rusage)
            try:
                status = Path(f"/proc/{replay.pid}/status").read_text()
                peak_kb = max(peak_kb, int(next(l for l in status.splitlines() if l.startswith("VmHWM")).split()[1]))
            except (OSError, StopIteration):
                pass
            time.sleep(0.01)
        wall = time.perf_counter() - started
    report["edge_replay_1080p_30_frames"] = {
        "wall_s_including_startup": round(wall, 2),
        "frames_per_s_including_startup_and_png_decode": round(30 / wall, 1),
        "peak_rss_mb": round(peak_kb / 1024, 1),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
