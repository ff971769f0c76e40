"""``edge``: the device side of leukoscope: replay files, run the agent, check a device."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edge import DISCLAIMER
from edge.console import run_command, setup_logging

DEFAULT_BUNDLE = Path(__file__).resolve().parent.parent / "models" / "default"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge", description="leukoscope on the microscope: find white cells, classify them, "
                                     "tally per sample and publish. " + DISCLAIMER)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    replay = commands.add_parser("replay", help="run the pipeline on image files (no camera, no broker)",
                                 description="Segment and classify every image of a folder (or one file) and print the "
                                             "per-frame results and the sample tally.")
    replay.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE, help=f"model bundle folder (default: {DEFAULT_BUNDLE})")
    replay.add_argument("--source", type=Path, required=True, help="folder of frames or one image file")
    replay.add_argument("--json", action="store_true", help="JSON Lines on stdout: one frame result per line, then the sample summary")
    replay.add_argument("--annotate", type=Path, metavar="OUT_DIR", help="write annotated frames and flagged crops here")
    replay.add_argument("--sample-id", default=None, help="sample id to put in results (default: the source folder name)")
    replay.add_argument("--cell-diameter", type=float, default=None, metavar="PX",
                        help="typical white-cell diameter in frame pixels (default 180: 100x oil, 640x480)")
    replay.add_argument("--num-threads", type=int, default=2, help="interpreter threads (default 2)")

    run = commands.add_parser("run", help="the service: camera -> pipeline -> durable outbox -> MQTT",
                              description="Run the agent with a validated TOML config (see firmware_config/leukoscope.toml).")
    run.add_argument("--config", type=Path, required=True, help="agent config file (TOML)")

    demo = commands.add_parser("demo", help="the whole device on the bundled sample frames (no camera, no broker needed)",
                               description="Run the agent on samples/frames with the bundled model: durable outbox, a local "
                                           "mosquitto and a subscriber where mosquitto is installed, annotated frames, a summary.")
    demo.add_argument("--workdir", type=Path, default=None, help="where the outbox and annotated frames go (default: a new temporary folder)")
    demo.add_argument("--frames", type=Path, default=None, help="frames to replay (default: samples/frames)")
    demo.add_argument("--bundle", type=Path, default=None, help="model bundle (default: models/default)")

    check = commands.add_parser("check", help="self-test: config, bundle, camera and broker; non-zero exit on failure")
    check.add_argument("--config", type=Path, required=True, help="agent config file (TOML)")
    return parser


def _replay(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from edge.classifier import Classifier
    from edge.pipeline import Pipeline, ReviewWriter
    from edge.results import SampleTally, numbered
    from edge.segmentation import SegmentationSettings
    from edge.sources.folder import FolderSourceSettings, open_source

    classifier = Classifier(args.bundle, num_threads=args.num_threads)
    settings = SegmentationSettings()
    if args.cell_diameter:
        settings = replace(settings, cell_diameter_px=args.cell_diameter)
    pipeline = Pipeline(classifier, settings)
    sample_id = args.sample_id or (args.source.name if args.source.is_dir() else args.source.stem)
    tally = SampleTally(sample_id)
    review = ReviewWriter(args.annotate, classifier.bundle.positive_label) if args.annotate else None
    if not args.json:
        print(f"{'frame':<36} {'cells':>5} {'blasts':>6}  p(ALL) per cell")
    sequence = 0  # no outbox here, so no persistent sequence: each replay numbers its results from 1
    for frame in open_source(FolderSourceSettings(path=args.source)):
        if frame.image is None:
            tally.unreadable_frames += 1
            print(f"edge: skipped {frame.name}: {frame.error}", file=sys.stderr)
            continue
        result, _, crops = pipeline.process(frame, sample_id)
        sequence += 1
        line = numbered(result, sequence)
        tally.add(result)
        if review:
            review.write(frame.image, result, crops)
        if args.json:
            print(line.decode(), flush=True)
        else:
            scores = " ".join(f"{c['p_all']:.2f}{'*' if c['label'] == classifier.bundle.positive_label else ''}" for c in result["cells"])
            print(f"{frame.name[:36]:<36} {result['counts']['cells']:>5} {result['counts']['blasts']:>6}  {scores}")
    summary = tally.summary(pipeline.device_id, final=True)
    if args.json:
        print(json.dumps(summary))
    else:
        fraction = "n/a" if summary["blast_fraction"] is None else (
            f"{summary['blast_fraction']:.1%} (95% CI {summary['blast_fraction_ci95'][0]:.1%}-{summary['blast_fraction_ci95'][1]:.1%})")
        print(f"\nsample {sample_id}: {summary['frames']} frames, {summary['cells']} cells, {summary['blasts']} flagged as ALL blasts; "
              f"blast fraction {fraction}" + (f"; {summary['unreadable_frames']} unreadable frame(s) skipped" if summary["unreadable_frames"] else ""))
        if review:
            print(f"annotated frames in {args.annotate} (flagged crops in {args.annotate / 'flagged'})")
        print(DISCLAIMER)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)

    def command() -> int:
        if args.command == "replay":
            return _replay(args)
        if args.command == "demo":
            from edge.demo import SAMPLES, run_demo

            return run_demo(args.workdir, args.frames or SAMPLES, args.bundle)
        from edge import agent

        if args.command == "run":
            return agent.run(args.config)
        return agent.check(args.config)

    return run_command(command, "edge")


if __name__ == "__main__":
    sys.exit(main())
