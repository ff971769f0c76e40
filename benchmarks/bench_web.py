"""What the local page costs the agent: RSS, CPU and pipeline frames/s with the page off, and on with one
client watching the live view (MJPEG stream + the page's 1 s status poll), in the same run.

    python benchmarks/bench_web.py [--seconds 20] [--rounds 2] [--frames samples/frames]

The agent runs as the service does (``edge run``, a child process), replaying the frames unpaced so that
inference runs flat out: any CPU the page takes shows as lost frames/s. Agents with the page off and on alternate
(off, on, off, on; a fresh process each) so that load from elsewhere on the machine falls on both. Prints one JSON object. Budget (issue 12):
agent RSS <= 150 MB, frames/s with the page on within 10% of off.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge.calibration import read_scale_file  # noqa: E402
from tests.broker import free_port  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def proc(pid: int) -> tuple[float, int, int]:
    """(CPU seconds, RSS kB, peak RSS kB) of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / TICKS
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return cpu, int(status["VmRSS"].split()[0]), int(status["VmHWM"].split()[0])


def sequence(outbox: Path) -> int:
    """Results stored so far: the outbox's persistent sequence (0 while the file is still being made)."""
    try:
        with sqlite3.connect(f"file:{outbox}?mode=ro", uri=True) as db:
            row = db.execute("SELECT value FROM counters WHERE name = 'sequence'").fetchone()
    except sqlite3.OperationalError:
        return 0
    return int(row[0]) if row else 0


class Viewer:
    """One browser on the live page: reads the MJPEG stream and polls /api/live every second."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.stop = threading.Event()
        self.frames = self.bytes = self.polls = 0
        self.threads = [threading.Thread(target=self._stream, daemon=True), threading.Thread(target=self._poll, daemon=True)]
        for thread in self.threads:
            thread.start()

    def _stream(self) -> None:
        with urllib.request.urlopen(self.url + "stream.mjpg", timeout=10) as stream:
            while not self.stop.is_set():
                chunk = stream.read1(65536)
                if not chunk:
                    return
                self.bytes += len(chunk)
                self.frames += chunk.count(b"--frame")

    def _poll(self) -> None:
        while not self.stop.wait(1.0):
            urllib.request.urlopen(self.url + "api/live", timeout=10).read()
            self.polls += 1

    def close(self) -> None:
        self.stop.set()


def window(pid: int, outbox: Path, seconds: float) -> dict:
    cpu0, _, _ = proc(pid)
    seq0, t0 = sequence(outbox), time.monotonic()
    time.sleep(seconds)
    cpu1, rss, peak = proc(pid)
    seq1, t1 = sequence(outbox), time.monotonic()
    return {"fps": (seq1 - seq0) / (t1 - t0), "cpu_cores": (cpu1 - cpu0) / (t1 - t0), "rss_mb": rss / 1024, "peak_rss_mb": peak / 1024}


class EdgeRun:
    """``edge run`` in a child process, replaying unpaced, with the page off or on."""

    def __init__(self, work: Path, frames: Path, web: bool) -> None:
        self.port = free_port()
        self.outbox = work / f"outbox-{time.monotonic_ns()}.sqlite3"
        config = work / "agent.toml"
        config.write_text(f'[device]\nid = "bench"\n[source]\ntype = "folder"\npath = "{frames}"\nloop = true\n'
                          f'[segmentation]\num_per_px = {read_scale_file(frames)}\n[classifier]\nnum_threads = 1\n'
                          f'[mqtt]\nenabled = false\n[outbox]\npath = "{self.outbox}"\nmax_messages = 1000000\n'
                          f'[web]\nenabled = {str(web).lower()}\nport = {self.port}\nreview_db = "{work / "reviews.sqlite3"}"\n')
        self.log = (work / "agent.log").open("a")
        self.process = subprocess.Popen([sys.executable, "-m", "edge.cli", "run", "--config", str(config)], cwd=ROOT,
                                        stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not self.outbox.exists() or sequence(self.outbox) < 20:  # warmed up: model loaded, caches hot
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise SystemExit(f"the agent did not start; see {work / 'agent.log'}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=60)
        self.log.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each measured window (default 20)")
    parser.add_argument("--rounds", type=int, default=2, help="off/on pairs (default 2)")
    parser.add_argument("--frames", type=Path, default=ROOT / "samples" / "frames", help="frames to replay")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-web-"))
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    viewers = []
    for _ in range(args.rounds):
        for mode in ("off", "on"):
            agent = EdgeRun(work, args.frames, web=mode == "on")
            try:
                viewer = Viewer(f"http://127.0.0.1:{agent.port}/") if mode == "on" else None
                runs[mode].append(window(agent.process.pid, agent.outbox, args.seconds))
                if viewer:
                    viewer.close()
                    viewers.append({"frames_streamed": viewer.frames, "mb_streamed": round(viewer.bytes / 1e6, 2),
                                    "polls": viewer.polls})
            finally:
                agent.stop()

    def summary(rows: list[dict]) -> dict:
        return {"fps": round(statistics.median(r["fps"] for r in rows), 2),
                "cpu_cores": round(statistics.median(r["cpu_cores"] for r in rows), 3),
                # CPU per frame: steadier than frames/s on a machine shared with other work
                "cpu_ms_per_frame": round(statistics.median(1000 * r["cpu_cores"] / r["fps"] for r in rows if r["fps"]), 2),
                "peak_rss_mb": round(max(r["peak_rss_mb"] for r in rows), 1),
                "windows": [{k: round(v, 2) for k, v in r.items()} for r in rows]}

    off, on = summary(runs["off"]), summary(runs["on"])
    print(json.dumps({
        "machine": f"{platform.machine()}, {os.cpu_count()} cores ({platform.platform()})",
        "frames": str(args.frames), "seconds_per_window": args.seconds, "page_off": off, "page_on_one_viewer": on,
        "viewer": viewers, "fps_change_percent": round(100 * (on["fps"] / off["fps"] - 1), 1),
        "cpu_change_cores": round(on["cpu_cores"] - off["cpu_cores"], 3),
        "cpu_per_frame_change_percent": round(100 * (on["cpu_ms_per_frame"] / off["cpu_ms_per_frame"] - 1), 1),
        "rss_change_mb": round(on["peak_rss_mb"] - off["peak_rss_mb"], 1),
        "budget": {"rss_le_150_mb": on["peak_rss_mb"] <= 150, "fps_within_10_percent": on["fps"] >= 0.9 * off["fps"]},
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
