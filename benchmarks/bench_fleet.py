"""Fleet: many devices publish through one mosquitto into one collector, across a broker outage.

    python benchmarks/bench_fleet.py [--devices 200] [--live 20] [--backlog 50] [--processes 4] [--postgres] [--bridged]

Each simulated device is the project's own ``Outbox`` and ``Publisher`` (one SQLite outbox and one
MQTT connection per device; no camera, no model: results are schema-valid frame results made by
``edge.results``), ``--processes`` processes holding them. The collector is ``collect run``.

1. live: every device stores and publishes ``--live`` results; wait until all are stored.
2. outage: the broker is stopped (it saves its queues); every device stores ``--backlog`` more,
   which wait in its outbox.
3. drain: the broker starts; the devices reconnect and send their backlogs; halfway through, the
   collector is stopped (SIGTERM) and started again. Drain rate = backlog / (broker start ->
   everything stored), reconnects and the collector's restart included.
4. ingest: the collector is stopped; every device sends ``--ingest`` more, which the broker queues
   for the collector's persistent session; the collector starts. Ingest rate = those results /
   (first of them stored -> all stored): what the collector alone sustains.

``--bridged``: the devices publish to a device broker bridged to a site broker, where the collector
subscribes (two mosquitto instances; the bridge is ``firmware_config/mosquitto-bridge.conf`` as shipped,
its lab address, TLS and credentials replaced by the site broker on loopback). Step 2 stops the device
broker, and one more step runs after 3:

3b. site outage: the site broker is stopped; every device stores ``--backlog`` more, which the device
    broker acknowledges (the devices' outboxes empty) and queues for the bridge; the device broker is
    restarted (its queue must survive on disk), then the site broker starts. Time = site broker start ->
    everything stored.

Then, from the database: results stored per device against produced (lost), sequences carried
twice (duplicated), gaps, and whether each device's results were stored in sequence order
(``Store.out_of_order``: SQLite's rowid, PostgreSQL's stored_order). Each broker's CPU seconds give the
messages one mosquitto thread handles per CPU second. Printed as one JSON object. Targets (issue 13):
0 lost, 0 duplicated, order kept; ingest >= 2,000 results/s with SQLite, >= 5,000 with PostgreSQL.
Needs mosquitto.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.broker import Broker  # noqa: E402

#: The site broker of the benchmark: its window towards the collector. mosquitto's default (20
#: unacknowledged QoS 1 messages per client) caps a collector that acknowledges after each commit.
SITE_BROKER = ["max_inflight_messages 1000", "max_queued_messages 1000000"]
BRIDGE_CONF = ROOT / "firmware_config" / "mosquitto-bridge.conf"
#: Lines of the shipped bridge config that name this Pi's listener or the lab's broker: the bench's own.
SITE_SPECIFIC = {"listener", "allow_anonymous", "persistence", "address", "bridge_cafile", "remote_clientid", "remote_username",
                 "remote_password"}


def bridge_config(site_port: int) -> list[str]:
    """The shipped device-broker config, bridged to the site broker on loopback: its QoS, session and queue
    settings as shipped (so the bench tests them), its one device's topics widened to the whole fleet."""
    lines = ["max_queued_messages 1000"]  # mosquitto's default again (tests/broker.py raises it): the shipped value must hold
    for line in BRIDGE_CONF.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or line.split()[0] in SITE_SPECIFIC:
            continue
        lines.append(line.replace("leukoscope/scope-01/", "leukoscope/+/"))
        if line.startswith("connection "):
            lines += [f"address 127.0.0.1:{site_port}", "remote_clientid fleet-bridge"]
    if not any(line.startswith("connection ") for line in lines):
        raise RuntimeError(f"{BRIDGE_CONF} has no 'connection' section")
    return lines


# -- the devices' processes -------------------------------------------------------------------
def devices_child(port: int, folder: Path, first: int, count: int) -> None:
    """Line protocol on stdin/stdout: ``produce N`` -> ``produced``; ``drain`` -> ``drained``; ``stop``."""
    from edge.config import MQTTConfig
    from edge.outbox import Outbox
    from edge.publisher import Publisher
    from edge.results import frame_result, numbered

    config = MQTTConfig(host="127.0.0.1", port=port, keepalive_s=10, reconnect_max_s=1.0, max_inflight=100)
    fleet = []
    for number in range(first, first + count):
        device_id = f"dev{number:04d}"
        outbox = Outbox(folder / f"{device_id}.sqlite3")
        publisher = Publisher(config, outbox, device_id)
        publisher.start()
        fleet.append((device_id, outbox, publisher))
    deadline = time.monotonic() + 60
    while not all(p.connected.is_set() for _, _, p in fleet):
        if time.monotonic() > deadline:
            sys.exit("fleet child: devices did not connect within 60 s")
        time.sleep(0.05)
    print("ready", flush=True)
    cells = [{"bbox": [10, 10, 60, 60], "area": 2100, "p_all": 0.81, "label": "all", "focus": 250.0},
             {"bbox": [90, 40, 140, 92], "area": 1900, "p_all": 0.12, "label": "hem", "focus": 240.0}]
    for line in sys.stdin:
        command, *rest = line.split()
        if command == "produce":
            for _ in range(int(rest[0])):
                for device_id, outbox, publisher in fleet:
                    result = frame_result(device_id=device_id, sample_id="FLEET-1", source="bench", cells=cells,
                                          timings_ms={"total": 40.0}, captured_at=time.time(), positive_label="all",
                                          focus=245.0, min_focus=50.0, bundle="0123456789abcdef")
                    outbox.put_numbered(f"leukoscope/{device_id}/results", lambda sequence, r=result: numbered(r, sequence))
                    publisher.notify()
            print("produced", flush=True)
        elif command == "drain":
            left = sum(not p.wait_drained(timeout=300) for _, _, p in fleet)
            print(f"drained {left}", flush=True)
        elif command == "stop":
            break
    for _, outbox, publisher in fleet:
        publisher.stop(offline=False)
        outbox.close()


class Devices(subprocess.Popen):
    def __init__(self, port: int, folder: Path, first: int, count: int) -> None:
        self.log = (folder / f"devices-{first}.log").open("w")  # their reconnect warnings, for a post-mortem
        super().__init__([sys.executable, __file__, "child", str(port), str(folder), str(first), str(count)], cwd=ROOT,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})

    def say(self, line: str) -> None:
        self.stdin.write(line + "\n")
        self.stdin.flush()

    def expect(self, word: str) -> str:
        line = self.stdout.readline().strip()
        if not line.startswith(word):
            raise RuntimeError(f"fleet child said {line!r} (exit {self.poll()}), expected {word!r}")
        return line


# -- the collector ----------------------------------------------------------------------------
class Collector(subprocess.Popen):
    def __init__(self, config: Path) -> None:
        self.log = config.with_suffix(".log").open("a")
        self.log_from = self.log.tell()  # this instance's lines start here (the log is shared by restarts)
        super().__init__([sys.executable, "-m", "collector.cli", "run", "--config", str(config)], cwd=ROOT,
                         stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})

    def wait_connected(self, timeout: float = 30.0) -> None:
        """Until its subscriptions are acknowledged (SUBACK): ``collect run`` exits when the broker is down at its start (systemd
        restarts it), so a broker stopped right after a collector restart would leave none running."""
        deadline = time.monotonic() + timeout
        path = Path(self.log.name)
        while "collector.service: subscribed" not in path.read_text()[self.log_from:]:
            if self.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the collector did not connect (exit {self.poll()}); see {path}")
            time.sleep(0.05)

    def stop(self) -> int:
        self.send_signal(signal.SIGTERM)
        return self.wait(30)


_counter: dict = {}


def stored(database: dict) -> int:
    """Results stored so far, through one kept connection (a new PostgreSQL connection per poll would
    cost the server a process start each time, taken from the collector being measured)."""
    from collector.store import Store

    key = database.get("url") or database["path"]
    if key not in _counter:
        _counter[key] = Store(url=database["url"]) if database.get("url") else Store(Path(database["path"]))
    return _counter[key].execute("SELECT COUNT(*) FROM frame_results").fetchone()[0]


def wait_stored(database: dict, expected: int, timeout: float, during=None) -> float:
    """Seconds until ``expected`` results are stored; ``during(count)`` is called on each poll."""
    started = time.monotonic()
    while True:
        count = stored(database)
        if during:
            during(count)
        if count >= expected:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"only {count} of {expected} results stored within {timeout:g} s")
        time.sleep(0.1)


def produce(children: "list[Devices]", count: int) -> None:
    """Every device process makes ``count`` results per device, all at once; returns when all have."""
    for child in children:
        child.say(f"produce {count}")
    for child in children:
        child.expect("produced")


def drain(children: "list[Devices]") -> int:
    """Every device process delivers its outboxes; returns how many results stayed undelivered."""
    for child in children:
        child.say("drain")
    return sum(int(child.expect("drained").split()[1]) for child in children)


def fleet(devices: int = 200, live: int = 20, backlog: int = 50, ingest: int = 50, processes: int = 4, postgres_url: str | None = None,
          folder: Path | None = None, timeout: float = 300.0, bridged: bool = False) -> dict:
    """Run the phases (module docstring); returns the measures and the checks."""
    own_folder = folder is None
    folder = Path(folder or tempfile.mkdtemp(prefix="leukoscope-fleet-"))
    broker = Broker(folder / "broker", extra=SITE_BROKER).start()  # the collector's (the site broker when bridged)
    device_broker = Broker(folder / "device-broker", extra=bridge_config(broker.port)).start() if bridged else broker  # the devices'
    database = {"url": postgres_url} if postgres_url else {"path": str(folder / "results.sqlite3")}
    config = folder / "collector.toml"
    section = f'url = "{postgres_url}"' if postgres_url else f'path = "{database["path"]}"'
    config.write_text(f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\nclient_id = "fleet-collector"\nreconnect_max_s = 1.0\n'
                      f'[database]\n{section}\n[batch]\nmax_messages = 1000\nmax_delay_ms = 100\n')
    collector = Collector(config)
    children: list[Devices] = []
    try:
        wait_stored(database, 0, 30)  # the collector has created its schema
        collector.wait_connected()  # and its subscriptions are acknowledged: nothing the devices publish is missed
        share = -(-devices // processes)
        for first in range(0, devices, share):
            (folder / "outboxes").mkdir(exist_ok=True)
            children.append(Devices(device_broker.port, folder / "outboxes", first, min(share, devices - first)))
        for child in children:
            child.expect("ready")

        started = time.monotonic()
        produce(children, live)
        wait_stored(database, devices * live, timeout)
        live_s = time.monotonic() - started

        device_broker.stop()
        started = time.monotonic()
        produce(children, backlog)
        produce_s = time.monotonic() - started

        total = devices * (live + backlog)
        restart = {"done": False}

        def restart_collector_halfway(count: int) -> None:
            nonlocal collector
            if not restart["done"] and count >= devices * live + devices * backlog // 2:
                restart["done"] = True
                restart["exit"] = collector.stop()
                collector = Collector(config)

        device_broker.start()
        drain_s = wait_stored(database, total, timeout, during=restart_collector_halfway)
        undelivered = drain(children)

        site_outage_s = None
        if bridged:
            collector.wait_connected()
            broker.stop()
            produce(children, backlog)
            undelivered += drain(children)  # acknowledged by the device broker: now only in its bridge queue
            device_broker.stop()  # saves the bridge queue
            device_broker.start()
            broker.start()
            total += devices * backlog
            site_outage_s = wait_stored(database, total, timeout)

        collector.stop()
        produce(children, ingest)
        undelivered += drain(children)  # delivered to the broker, which queues them for the collector
        collector = Collector(config)
        wait_stored(database, total + 1, timeout)
        first = stored(database)
        ingest_s = wait_stored(database, total + devices * ingest, timeout)
        # None when too few to time: the collector stored them all before the first poll
        ingest_rate = (total + devices * ingest - first) / ingest_s if ingest_s and total + devices * ingest > first else None
        total += devices * ingest
        checks = check(database, devices, live + backlog * (2 if bridged else 1) + ingest)
    finally:
        for child in children:
            if child.poll() is None:
                child.say("stop")
        for child in children:
            try:
                child.wait(60)
            except subprocess.TimeoutExpired:
                child.kill()
        if collector.poll() is None:
            collector.stop()
        device_broker.stop()
        broker.stop()
        for store in _counter.values():
            store.close()
        _counter.clear()
        if own_folder:
            shutil.rmtree(folder, ignore_errors=True)
    return {
        "benchmark": "fleet", "database": "postgresql" if postgres_url else "sqlite", "bridged": bridged, "devices": devices,
        "processes": len(children), "results": total, "live_per_device": live, "backlog_per_device": backlog,
        "live_s": round(live_s, 2), "live_results_per_s": round(devices * live / live_s, 1) if live_s else None,
        "backlog_produce_s": round(produce_s, 2), "drain_s": round(drain_s, 2),
        "drain_results_per_s": round(devices * backlog / drain_s, 1) if drain_s else None,
        "ingest_per_device": ingest, "ingest_results_per_s": None if ingest_rate is None else round(ingest_rate, 1),
        "site_outage_drain_s": None if site_outage_s is None else round(site_outage_s, 2),
        "collector_restarted_mid_drain": restart["done"], "collector_exit": restart.get("exit"),
        "undelivered_in_outboxes": undelivered, **checks,
        # per result: one QoS 1 publish in and one out, at each broker on the way
        "broker_cpu_s": round(broker.cpu_s, 2), "device_broker_cpu_s": round(device_broker.cpu_s, 2) if bridged else None,
        "broker_results_per_cpu_s": round(total / broker.cpu_s) if broker.cpu_s else None,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }


def check(database: dict, devices: int, per_device: int) -> dict:
    from collector.store import Store

    store = Store(url=database["url"]) if database.get("url") else Store(Path(database["path"]))
    try:
        ranges = {device: (n, low, high, repeats) for device, n, low, high, repeats in store.sequence_ranges()}
        gaps = store.gaps()
        out_of_order = store.out_of_order()
        lost = sum(per_device - ranges.get(f"dev{n:04d}", (0,))[0] for n in range(devices))
        return {"stored": sum(r[0] for r in ranges.values()), "lost": lost, "duplicated": sum(r[3] for r in ranges.values()),
                "gaps": len(gaps), "out_of_order": out_of_order,
                "devices_complete": sum(r[0] == per_device and r[1] == 1 and r[2] == per_device for r in ranges.values())}
    finally:
        store.close()


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        devices_child(int(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--live", type=int, default=20, help="results per device published with the broker up")
    parser.add_argument("--backlog", type=int, default=50, help="results per device stored while the broker is down")
    parser.add_argument("--ingest", type=int, default=50, help="results per device queued by the broker for a stopped collector")
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--postgres", action="store_true", help="store in PostgreSQL (a private cluster, tests/postgres.py)")
    parser.add_argument("--bridged", action="store_true", help="devices -> device broker -> bridge -> site broker -> collector "
                        "(firmware_config/mosquitto-bridge.conf), with a site broker outage and a device broker restart")
    args = parser.parse_args()
    server = None
    url = None
    if args.postgres:
        from tests.postgres import for_benchmark

        server = for_benchmark("bench_fleet")
        url = server.new_database()
    try:
        print(json.dumps(fleet(args.devices, args.live, args.backlog, args.ingest, args.processes, url, bridged=args.bridged)))
    finally:
        if server:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
