"""Soak: `edge run` through fault cycles against a real mosquitto, and what a subscriber receives.

    python benchmarks/bench_soak.py [--cycles 12] [--run-s 15] [--fps 30] [--faults all] [--max-minutes 30]

The agent replays samples/frames in a loop. Each cycle lets it run ``--run-s`` seconds, then
injects the next fault of the list, in turn:

    broker_stop           mosquitto stopped (SIGTERM: it saves its queues) for a few seconds
    sigkill               the agent SIGKILLed, then started again
    sigterm               the agent stopped with SIGTERM, then started again
    sigkill_in_drain      the broker stopped until a backlog builds, started, and the agent
                          SIGKILLed while it drains that backlog
    sigterm_broker_down   the agent stopped with SIGTERM while the broker is down (it waits
                          mqtt.stop_timeout_s), started again, then the broker comes back

A persistent subscriber (clean_session=False, QoS 1) counts every result delivery. At the end
the agent is stopped with SIGTERM while the broker is up, so that the outbox drains. Printed as
one JSON object: produced (the outbox's persistent sequence), received, lost, duplicates (and
whether each is byte-identical to the first delivery: same message_id), sequence gaps and
reuse, stop times, and the agent's RSS per process with the trend of the longest-lived one.

Bounded: at most ``--cycles`` cycles and ``--max-minutes`` of cycling, then at most a minute to
drain. Everything runs on 127.0.0.1; needs mosquitto (apt-get install mosquitto). For a long
run (hours), see the README (Measured performance, Soak); run it under ``nice``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from edge.calibration import read_scale_file  # noqa: E402
from edge.outbox import Outbox  # noqa: E402
from tests.broker import Broker  # noqa: E402

WARM_UP_S = 10.0  # RSS before this is the process starting up, not its steady state
MIN_TREND_S = 120.0  # a slope over a shorter life says nothing
FAULTS = ("broker_stop", "sigkill", "sigterm", "sigkill_in_drain", "sigterm_broker_down")
DEVICE = "soak"


class Tally:
    """A persistent QoS 1 subscriber that keeps, per result, only what the counts need (hours of results fit)."""

    def __init__(self, port: int) -> None:
        self.lock = threading.Lock()
        self.first: dict[str, bytes] = {}  # message_id -> digest of its first delivery
        self.sequence_of: dict[int, str] = {}  # sequence -> message_id
        self.deliveries = 0
        self.changed_duplicates = 0  # a redelivery whose bytes differ from the first delivery
        self.sequence_reused = 0  # a sequence number carried by two different message_ids
        self.run_ids: set[str] = set()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="soak-subscriber", clean_session=False)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"leukoscope/{DEVICE}/results", qos=1)
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.2, 1)
        self.client.connect_async("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client, userdata, message) -> None:
        result = json.loads(message.payload)
        digest = hashlib.blake2b(message.payload, digest_size=8).digest()
        with self.lock:
            self.deliveries += 1
            first = self.first.setdefault(result["message_id"], digest)
            self.changed_duplicates += first != digest
            owner = self.sequence_of.setdefault(result["sequence"], result["message_id"])
            self.sequence_reused += owner != result["message_id"]
            self.run_ids.add(result["run_id"])

    def received(self) -> set[int]:
        with self.lock:
            return set(self.sequence_of)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Soak:
    def __init__(self, work: Path, fps: float, seed: int) -> None:
        self.work = work
        self.rng = random.Random(seed)
        self.broker = Broker(work / "broker").start()
        self.tally = Tally(self.broker.port)
        self.outbox = work / "outbox.sqlite3"
        self.config = work / "agent.toml"
        frames = ROOT / "samples" / "frames"
        self.config.write_text(f'[device]\nid = "{DEVICE}"\n'
                               f'[source]\ntype = "folder"\npath = "{frames}"\nloop = true\nfps = {fps}\n'
                               f'[segmentation]\num_per_px = {read_scale_file(frames)}\n'
                               f'[classifier]\nnum_threads = 1\n'
                               f'[mqtt]\nhost = "127.0.0.1"\nport = {self.broker.port}\nkeepalive_s = 5\nreconnect_max_s = 2\n'
                               f'stats_interval_s = 5\n[outbox]\npath = "{self.outbox}"\n[pipeline]\nsample_id = "SOAK"\n')
        self.log = (work / "agent.log").open("a")
        self.agent: subprocess.Popen | None = None
        self.started = 0.0
        self.rss: list[list[tuple[float, float]]] = []  # per agent process: (seconds since its start, MB)
        self.stops: list[dict] = []
        self.faults = {kind: 0 for kind in FAULTS}

    def start_agent(self) -> None:
        if self.agent is not None and self.agent.poll() is not None and self.agent.returncode == 2:
            raise SystemExit(f"bench_soak: the agent refused to run (exit 2); see {self.work / 'agent.log'}")
        self.agent = subprocess.Popen([sys.executable, "-m", "edge.cli", "run", "--config", str(self.config)], cwd=ROOT,
                                      stdout=self.log, stderr=subprocess.STDOUT)
        self.started = time.monotonic()
        self.rss.append([])

    def kill_agent(self) -> None:
        self.agent.send_signal(signal.SIGKILL)
        self.agent.wait()

    def stop_agent(self, broker_up: bool) -> None:
        began = time.monotonic()
        self.agent.send_signal(signal.SIGTERM)
        status = self.agent.wait(timeout=120)
        self.stops.append({"seconds": round(time.monotonic() - began, 2), "broker_up": broker_up, "exit": status})

    def run_for(self, seconds: float) -> None:
        """Wait, sampling the agent's RSS once a second."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                status = Path(f"/proc/{self.agent.pid}/status").read_text()
                kb = int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1])
                self.rss[-1].append((round(time.monotonic() - self.started, 1), round(kb / 1024, 1)))
            except (OSError, StopIteration):
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(1.0, left))

    def fault(self, kind: str) -> None:
        self.faults[kind] += 1
        outage = self.rng.uniform(2, 6)
        if kind == "broker_stop":
            self.broker.stop()
            self.run_for(outage)
            self.broker.start()
        elif kind == "sigkill":
            self.kill_agent()
            self.start_agent()
        elif kind == "sigterm":
            self.stop_agent(broker_up=True)
            self.start_agent()
        elif kind == "sigkill_in_drain":
            self.broker.stop()
            self.run_for(outage)
            self.broker.start()
            self.run_for(self.rng.uniform(0.2, 1.5))  # reconnect (up to reconnect_max_s) and part of the drain
            self.kill_agent()
            self.start_agent()
        else:  # sigterm_broker_down
            self.broker.stop()
            self.run_for(1)
            self.stop_agent(broker_up=False)
            self.start_agent()
            self.run_for(outage)
            self.broker.start()

    def finish(self) -> dict:
        """Stop with the broker up (the outbox drains), then read what was produced and what arrived."""
        self.run_for(5)
        self.stop_agent(broker_up=True)
        box = Outbox(self.outbox)
        produced = box.sequence
        left = {json.loads(m.payload)["sequence"] for m in box.pending(limit=10**9) if m.topic.endswith("/results")}
        box.close()
        expected = set(range(1, produced + 1)) - left
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not expected <= self.tally.received():
            time.sleep(0.2)
        time.sleep(1)  # late redeliveries
        received = self.tally.received()
        lost = sorted(expected - received)
        with self.tally.lock:
            deliveries, distinct, runs = self.tally.deliveries, len(self.tally.first), len(self.tally.run_ids)
            changed, reused = self.tally.changed_duplicates, self.tally.sequence_reused
        return {"produced": produced, "received": distinct, "lost": len(lost), "lost_sequences_first": lost[:20],
                "left_in_outbox": len(left), "run_ids_received": runs, "deliveries": deliveries, "duplicates": deliveries - distinct,
                "duplicates_with_their_original_message_id": deliveries - distinct - changed, "duplicates_changed": changed,
                "sequence_gaps": len(set(range(1, max(received, default=0) + 1)) - received), "sequence_reused": reused}

    def close(self) -> None:
        if self.agent and self.agent.poll() is None:
            self.kill_agent()
        self.tally.close()
        self.broker.stop()
        self.log.close()


def rss_report(processes: list[list[tuple[float, float]]]) -> dict:
    """Per process, after its first WARM_UP_S (imports, model load): first, last and max MB. For the
    longest-lived one, the least-squares slope in MB per hour, where it lived long enough to mean something."""
    lives = [[(t, mb) for t, mb in p if t >= WARM_UP_S] for p in processes]
    lives = [p for p in lives if p]
    longest = max(lives, key=lambda p: p[-1][0], default=[])
    slope = None
    if longest and longest[-1][0] - longest[0][0] >= MIN_TREND_S:
        mean_t = sum(t for t, _ in longest) / len(longest)
        mean_mb = sum(mb for _, mb in longest) / len(longest)
        var = sum((t - mean_t) ** 2 for t, _ in longest)
        slope = round(3600 * sum((t - mean_t) * (mb - mean_mb) for t, mb in longest) / var, 2)
    minutes: dict[int, list[float]] = {}
    for t, mb in longest:
        minutes.setdefault(int(t // 60), [t, mb])  # the first sample of each minute: the trend at a glance
    return {"warm_up_s": WARM_UP_S, "processes_sampled": len(lives),
            "per_process": [{"seconds": p[-1][0], "first_mb": p[0][1], "last_mb": p[-1][1], "max_mb": max(mb for _, mb in p)}
                            for p in lives],
            "longest": {"seconds": longest[-1][0] if longest else 0, "first_mb": longest[0][1] if longest else None,
                        "last_mb": longest[-1][1] if longest else None, "max_mb": max((mb for _, mb in longest), default=None),
                        "slope_mb_per_hour": slope,
                        "by_minute": list(minutes.values())}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=12, help="fault cycles (default 12)")
    parser.add_argument("--run-s", type=float, default=15.0, help="seconds the agent runs between faults (default 15)")
    parser.add_argument("--fps", type=float, default=30.0, help="frames per second the replay feeds the agent (default 30)")
    parser.add_argument("--faults", default="all", help=f"comma-separated, in turn: {','.join(FAULTS)} (default all)")
    parser.add_argument("--max-minutes", type=float, default=30.0, help="stop cycling after this long (default 30)")
    parser.add_argument("--seed", type=int, default=14, help="seed for outage lengths and kill moments")
    args = parser.parse_args()
    kinds = FAULTS if args.faults == "all" else tuple(args.faults.split(","))
    unknown = set(kinds) - set(FAULTS)
    if unknown or args.cycles < 1 or args.run_s <= 0 or args.fps <= 0:
        parser.error(f"unknown fault(s) {sorted(unknown)}; use {', '.join(FAULTS)}" if unknown else
                     "--cycles must be at least 1, --run-s and --fps positive")
    work = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    soak = Soak(work, args.fps, args.seed)
    began = time.monotonic()
    deadline = began + 60 * args.max_minutes
    try:
        soak.start_agent()
        cycles = 0
        while cycles < args.cycles and time.monotonic() < deadline:
            soak.run_for(min(args.run_s, max(0.0, deadline - time.monotonic())))
            soak.fault(kinds[cycles % len(kinds)])
            cycles += 1
        counts = soak.finish()
    finally:
        soak.close()
    elapsed = time.monotonic() - began
    report = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "broker": soak.broker.kind,
              "settings": {"cycles": cycles, "run_s": args.run_s, "fps": args.fps, "faults": list(kinds), "seed": args.seed},
              "duration_s": round(elapsed, 1), "faults": soak.faults, "agent_starts": len(soak.rss), **counts,
              "results_per_s": round(counts["produced"] / elapsed, 1),
              "stops": {"count": len(soak.stops), "all_exit_0": all(s["exit"] == 0 for s in soak.stops),
                        "max_s_broker_up": max((s["seconds"] for s in soak.stops if s["broker_up"]), default=None),
                        "max_s_broker_down": max((s["seconds"] for s in soak.stops if not s["broker_up"]), default=None)},
              "rss_mb": rss_report(soak.rss), "work": str(work)}
    print(json.dumps(report, indent=2))
    if counts["produced"] == 0:  # an agent that never ran is not a soak that passed
        raise SystemExit(f"bench_soak: no result was produced; see {soak.work / 'agent.log'}")


if __name__ == "__main__":
    main()
