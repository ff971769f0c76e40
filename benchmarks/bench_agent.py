"""The service's costs on this machine: outbox-to-broker throughput, draining a one-hour backlog,
the agent's overhead over the bare pipeline, and its peak RSS.

    python benchmarks/bench_agent.py [--backlog 36000] [--bccd ../shared/data/bccd]

Needs mosquitto (apt-get install mosquitto); everything runs on loopback. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge.agent import Agent  # noqa: E402
from edge.calibration import read_scale_file  # noqa: E402
from edge.classifier import Classifier  # noqa: E402
from edge.config import parse_config  # noqa: E402
from edge.outbox import Outbox  # noqa: E402
from edge.pipeline import Pipeline  # noqa: E402
from edge.preprocessing import read_rgb  # noqa: E402
from edge.publisher import Publisher  # noqa: E402
from edge.segmentation import SegmentationSettings  # noqa: E402
from edge.sources import Frame  # noqa: E402
from benchmarks.bench_pipeline import tiled  # noqa: E402
from tests.broker import Broker  # noqa: E402
from trainer.crosslab import BCCD_UM_PER_PX  # noqa: E402  (the 1080p frames are tiled from BCCD's at its scale)



def drain(broker: Broker, work: Path, count: int) -> dict:
    frames = ROOT / "samples" / "frames"
    frame = read_rgb(sorted(frames.glob("composed_*.jpg"))[0])
    pipeline = Pipeline(Classifier(ROOT / "models" / "default"), SegmentationSettings(um_per_px=read_scale_file(frames)))
    result, _, _ = pipeline.process(Frame(frame, "composed_01.jpg"), "S1")
    payload = json.dumps(result).encode()
    outbox = Outbox(work / "backlog.sqlite3", max_messages=count + 10)
    started = time.perf_counter()
    for _ in range(count):
        outbox.put("leukoscope/bench/results", payload)
    fill_s = time.perf_counter() - started
    config = parse_config({"source": {"type": "folder", "path": str(work)}, "mqtt": {"host": "127.0.0.1", "port": broker.port,
                                                                                       "max_inflight": 1000}}).mqtt
    publisher = Publisher(config, outbox, "bench")
    started = time.perf_counter()
    publisher.start()
    drained = publisher.wait_drained(timeout=600)
    drain_s = time.perf_counter() - started
    publisher.stop()
    return {"results": count, "payload_bytes": len(payload), "durable_writes_per_s": round(count / fill_s),
            "drained": drained, "drain_s": round(drain_s, 2), "delivered_per_s": round(count / drain_s)}


def overhead(broker: Broker, frames: Path, count: int) -> dict:
    classifier = Classifier(ROOT / "models" / "default")
    pipeline = Pipeline(classifier, SegmentationSettings(um_per_px=BCCD_UM_PER_PX))
    files = sorted(frames.iterdir())
    started = time.perf_counter()
    for path in files:
        pipeline.process(Frame(read_rgb(path), path.name))
    bare_fps = count / (time.perf_counter() - started)
    work = Path(tempfile.mkdtemp())
    agent = Agent(parse_config({"source": {"type": "folder", "path": str(frames)},
                                "segmentation": {"um_per_px": BCCD_UM_PER_PX},
                                "mqtt": {"host": "127.0.0.1", "port": broker.port},
                                "outbox": {"path": str(work / "o.sqlite3")}}))
    agent.started = time.monotonic()  # from the first frame, not from loading the model
    agent.run()
    agent_fps = agent.counters["frames_processed"] / (agent.last_progress - agent.started)
    return {"frames": count, "pipeline_alone_fps": round(bare_fps, 1), "agent_fps": round(agent_fps, 1),
            "overhead_percent": round(100 * (1 - agent_fps / bare_fps), 1)}


def _proc_kb(pid: int, file: str, key: str) -> int:
    text = Path(f"/proc/{pid}/{file}").read_text()
    return int(next(line for line in text.splitlines() if line.startswith(key)).split()[1])


def _descendants(pid: int) -> list[int]:
    """Every process under ``pid``: children of any of its threads, and theirs."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (int(text) for text in (task / "children").read_text().split()):
            found += [child] + _descendants(child)
    return found


def peak_rss(broker: Broker, frames: Path, seconds: float, processes: bool = False) -> dict:
    """Peak RSS of `edge run` at 10 frames/s; with ``pipeline.processes`` also its worker processes (the
    fork server and one per worker): their peak RSS summed (shared pages counted in each) and the tree's
    proportional set size (shared pages split between the processes that map them) at the end."""
    work = Path(tempfile.mkdtemp())
    config = work / "agent.toml"
    config.write_text(f'[source]\ntype = "folder"\npath = "{frames}"\nloop = true\nfps = 10\n'
                      f'[segmentation]\num_per_px = {BCCD_UM_PER_PX}\n[pipeline]\nprocesses = {str(processes).lower()}\n'
                      f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\n[outbox]\npath = "{work / "o.sqlite3"}"\n')
    agent = subprocess.Popen([sys.executable, "-m", "edge.cli", "run", "--config", str(config)], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(seconds)
    tree = [agent.pid] + _descendants(agent.pid)
    hwm = _proc_kb(agent.pid, "status", "VmHWM")
    report = {"seconds": seconds, "fps_setting": 10, "frame": "1920x1080", "processes": processes,
              "peak_rss_mb": round(hwm / 1024, 1)}
    if processes:
        report["processes_in_tree"] = len(tree)
        report["tree_peak_rss_sum_mb"] = round(sum(_proc_kb(pid, "status", "VmHWM") for pid in tree) / 1024, 1)
        report["tree_pss_mb"] = round(sum(_proc_kb(pid, "smaps_rollup", "Pss:") for pid in tree) / 1024, 1)
    else:
        report["pss_mb"] = round(_proc_kb(agent.pid, "smaps_rollup", "Pss:") / 1024, 1)
    agent.send_signal(signal.SIGTERM)
    agent.wait(timeout=60)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backlog", type=int, default=36_000, help="results in the backlog (one hour at 10 frames/s)")
    parser.add_argument("--bccd", type=Path, default=ROOT.parent / "shared" / "data" / "bccd")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-agent-"))
    frames = work / "frames"
    frames.mkdir()
    sources = sorted((args.bccd / "JPEGImages").glob("*.jpg"))[:40]
    for i, path in enumerate(sources):  # 1080p frames tiled from real smears at native scale
        big = tiled([cv2.imread(str(sources[(i + k) % len(sources)])) for k in range(9)], 1920, 1080)
        cv2.imwrite(str(frames / f"f{i:03d}.jpg"), big, [cv2.IMWRITE_JPEG_QUALITY, 92])
    broker = Broker(work / "broker").start()
    try:
        report = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "broker": broker.kind,
                  "backlog": drain(broker, work, args.backlog),
                  "agent_overhead_1080p": overhead(broker, frames, len(sources)),
                  "agent_peak_rss": peak_rss(broker, frames, 20),
                  "agent_peak_rss_processes": peak_rss(broker, frames, 20, processes=True)}
    finally:
        broker.stop()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
