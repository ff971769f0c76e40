"""Collector ingest alone: results queued at the broker for its persistent session, drained into the database.

    python benchmarks/bench_collector.py [--results 20000] [--devices 200] [--postgres]

A real mosquitto (window towards the collector: max_inflight_messages 1000) holds ``--results``
schema-valid frame results from ``--devices`` devices for the collector's session; the collector
(``collector.service.Collector``, in this process) then connects and stores them. Printed as one JSON
object: results per second from connect to the last one stored. Targets (issue 13): >= 2,000/s into
SQLite, >= 5,000/s into PostgreSQL. Needs mosquitto; --postgres needs PostgreSQL (tests/postgres.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from benchmarks.bench_fleet import SITE_BROKER  # noqa: E402
from collector.config import parse_config  # noqa: E402
from collector.service import Collector  # noqa: E402
from collector.store import Store  # noqa: E402
from edge.results import frame_result, numbered  # noqa: E402
from tests.broker import Broker  # noqa: E402

CELLS = [{"bbox": [10, 10, 60, 60], "area": 2100, "p_all": 0.81, "label": "all", "focus": 250.0},
         {"bbox": [90, 40, 140, 92], "area": 1900, "p_all": 0.12, "label": "hem", "focus": 240.0}]


def ingest(results: int, devices: int, url: str | None, folder: Path) -> dict:
    broker = Broker(folder / "broker", extra=SITE_BROKER).start()
    database = {"url": url} if url else {"path": str(folder / "results.sqlite3")}
    config = parse_config({"mqtt": {"host": "127.0.0.1", "port": broker.port, "client_id": "bench-collector"},
                           "database": database, "batch": {"max_messages": 1000, "max_delay_ms": 100}})
    store = Store(url=url) if url else Store(Path(database["path"]))
    try:
        first = Collector(config, store)  # subscribes once, so that the broker keeps the session and queues
        first.connect()
        first.client.disconnect()
        first.client.loop_stop()
        device = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-devices")
        device.connect("127.0.0.1", broker.port)
        device.loop_start()
        info = None
        for number in range(results):
            device_id = f"dev{number % devices:04d}"
            body = frame_result(device_id=device_id, sample_id="BENCH", source="bench", cells=CELLS, timings_ms={"total": 40.0},
                                captured_at=time.time(), positive_label="all", focus=245.0, min_focus=50.0, bundle="0123456789abcdef")
            info = device.publish(f"leukoscope/{device_id}/results", numbered(body, number // devices + 1), qos=1)
        info.wait_for_publish(120)
        device.disconnect()
        device.loop_stop()
        collector = Collector(config, store)
        started = time.monotonic()
        collector.connect()
        while collector.stored < results:
            collector.write_pending()
            if time.monotonic() - started > 600:
                raise RuntimeError(f"only {collector.stored} of {results} stored in 600 s")
        seconds = time.monotonic() - started
        collector.client.disconnect()
        collector.client.loop_stop()
        stored = store.execute("SELECT COUNT(*) FROM frame_results").fetchone()[0]
    finally:
        store.close()
        broker.stop()
    return {"benchmark": "collector_ingest", "database": store.kind, "results": results, "devices": devices, "stored": stored,
            "seconds": round(seconds, 2), "results_per_s": round(results / seconds, 1),
            "machine": {"cpus": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 1), "python": platform.python_version()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=int, default=20000)
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--postgres", action="store_true", help="into PostgreSQL (a private cluster, tests/postgres.py)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="leukoscope-collector-"))
    server = None
    try:
        url = None
        if args.postgres:
            from tests.postgres import for_benchmark

            server = for_benchmark("bench_collector")
            url = server.new_database()
        print(json.dumps(ingest(args.results, args.devices, url, folder)))
    finally:
        if server:
            server.stop()
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
