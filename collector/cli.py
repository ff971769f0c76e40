"""``collect``: the lab's side of leukoscope: store every device's results, report gaps and samples."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path

from collector.config import DEFAULT_CONFIG, EXAMPLE, load_config
from edge import DISCLAIMER, __version__
from edge.console import run_command, setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="collect", description="leukoscope in the lab: collect every device's results "
                                     "from MQTT into one database, report sequence gaps and samples. " + DISCLAIMER)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=f"collector config (TOML; default {DEFAULT_CONFIG}; example {EXAMPLE})")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", parents=[common], help="the service: subscribe (persistent session, QoS 1) and store",
                        epilog="Example: collect run --config /etc/leukoscope/collector.toml")
    gaps = commands.add_parser("gaps", parents=[common], help="sequence numbers each device numbered but the collector never received",
                               epilog="Exit status 3 when there are gaps. Example: collect gaps --device scope-01")
    gaps.add_argument("--device", default=None, help="one device id (default: all)")
    dead = commands.add_parser("dead-letters", parents=[common], help="messages that were not stored as data, and why")
    dead.add_argument("--limit", type=int, default=50, help="newest N (default 50)")
    report = commands.add_parser("report", parents=[common], help="one sample's counts, blast fraction with 95%% CI, provenance",
                                 epilog="Example: collect report BM-42 --format html --out BM-42.html")
    report.add_argument("sample_id")
    report.add_argument("--format", choices=("csv", "html"), default="html")
    report.add_argument("--out", type=Path, default=None, help="file to write (default: stdout)")
    return parser


def _open_store(config_path: Path):
    from collector.store import open_store

    return open_store(load_config(config_path).database)


def _gaps(args: argparse.Namespace) -> int:
    store = _open_store(args.config)
    try:
        ranges, gaps = store.sequence_ranges(args.device), store.gaps(args.device)
    finally:
        store.close()
    if not ranges:
        print(f"no results stored{' for device ' + args.device if args.device else ''}")
        return 0
    for device, count, first, last, reused in ranges:
        missing = sum(g.missing for g in gaps if g.device_id == device)
        line = f"{device}: {count} results, sequence {first}..{last}, {missing} missing"
        if first > 1:
            line += f" (1..{first - 1} were before this collector's first result)"
        if reused:
            line += f", {reused} sequence numbers carried by more than one message_id (an outbox was reset?)"
        print(line)
    for gap in gaps:
        span = f"#{gap.first}" if gap.first == gap.last else f"#{gap.first}..#{gap.last}"
        print(f"  gap {gap.device_id} {span}: {gap.missing} result(s) never received")
    return 3 if gaps else 0


def _dead_letters(args: argparse.Namespace) -> int:
    store = _open_store(args.config)
    try:
        rows = store.dead_letters(args.limit)
    finally:
        store.close()
    for received, topic, reason, payload in rows:
        when = datetime.fromtimestamp(received, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        print(f"{when} {topic}: {reason} [{len(payload)} bytes]")
    return 0


def _report(args: argparse.Namespace) -> int:
    from collector.report import build_report, to_csv, to_html

    store = _open_store(args.config)
    try:
        report = build_report(store, args.sample_id)
    finally:
        store.close()
    text = to_csv(report) if args.format == "csv" else to_html(report)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
        print(f"report for {args.sample_id} written to {args.out}")
    else:
        sys.stdout.write(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)

    def command() -> int:
        if args.command == "run":
            from collector.service import run

            return run(load_config(args.config))
        if args.command == "gaps":
            return _gaps(args)
        if args.command == "dead-letters":
            return _dead_letters(args)
        return _report(args)

    return run_command(command, "collect")


if __name__ == "__main__":
    sys.exit(main())
