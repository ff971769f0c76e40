"""``edge``: the device side of leukoscope: replay files, run the agent, check a device."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from edge import DISCLAIMER, __version__
from edge.assets import DEFAULT_BUNDLE
from edge.calibration import SCALE_FILE
from edge.console import run_command, setup_logging
from edge.errors import UserError

if TYPE_CHECKING:  # pragma: no cover - the frame step pulls in OpenCV; --help must not wait for it
    from edge.sources import Frame
    from edge.step import Analysed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge", description="leukoscope on the microscope: find white cells, classify them, "
                                     "tally per sample and publish. " + DISCLAIMER)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    replay = commands.add_parser("replay", help="run the pipeline on image files (no camera, no broker)",
                                 description="Segment and classify every image of a folder (or one file) and print the "
                                             "per-frame results and the sample tally.",
                                 epilog="Example: edge replay --source samples/frames --annotate review")
    replay.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE, help=f"model bundle folder (default: {DEFAULT_BUNDLE})")
    replay.add_argument("--source", type=Path, required=True, help="folder of frames or one image file")
    replay.add_argument("--json", action="store_true", help="JSON Lines on stdout: one frame result per line, then the sample summary")
    replay.add_argument("--annotate", type=Path, metavar="OUT_DIR", help="write annotated frames and flagged crops here")
    replay.add_argument("--sample-id", default=None, help="sample id to put in results (default: the source folder name)")
    replay.add_argument("--um-per-px", type=float, default=None, metavar="F",
                        help=f"the frames' scale in µm per pixel (default: the folder's {SCALE_FILE}, else measured on the "
                             "frames' red cells; measure it with `edge calibrate`). A stated scale the red cells "
                             "contradict is used, with a warning")
    replay.add_argument("--num-threads", type=_at_least_one, default=None,
                        help="interpreter threads per frame (default: the cores each of --workers has)")
    replay.add_argument("--workers", type=_at_least_one, default=2, help="frames analysed at once, results in frame order (default 2)")
    replay.add_argument("--processes", action="store_true",
                        help="analyse in one process per worker instead of threads (faster on several cores, more memory)")

    calibrate = commands.add_parser(
        "calibrate", help="measure the microscope's scale (µm per pixel) on the red cells of a few frames",
        description="Red cells are ~7.5 µm across in a normal film: their size in a few frames gives µm per pixel. "
                    "Prints the scale, its spread between frames and the red cells counted; non-zero exit when it cannot measure.",
        epilog="Example: edge calibrate --source frames/ --write")
    calibrate.add_argument("--source", type=Path, required=True,
                           help="folder of frames, one image file, or an agent config (TOML) whose camera is read")
    calibrate.add_argument("--frames", type=int, default=40, help="frames to measure at most (default 40)")
    calibrate.add_argument("--json", action="store_true", help="print the measurement with every frame's estimate as JSON")
    calibrate.add_argument("--write", action="store_true", help=f"write the scale to {SCALE_FILE} in the source folder")

    run = commands.add_parser("run", help="the service: camera -> pipeline -> durable outbox -> MQTT",
                              description="Run the agent with a validated TOML config (see firmware_config/leukoscope.toml).",
                              epilog="Example: edge run --config /etc/leukoscope/leukoscope.toml")
    run.add_argument("--config", type=Path, required=True, help="agent config file (TOML)")

    demo = commands.add_parser("demo", help="the whole device on the bundled sample frames (no camera, no broker needed)",
                               description="Run the agent on samples/frames with the bundled model: durable outbox, a local "
                                           "mosquitto and a subscriber where mosquitto is installed, annotated frames, a summary.",
                               epilog="Example: edge demo --workdir /tmp/leukoscope-demo")
    demo.add_argument("--workdir", type=Path, default=None, help="where the outbox and annotated frames go (default: a new temporary folder)")
    demo.add_argument("--frames", type=Path, default=None, help="frames to replay (default: samples/frames)")
    demo.add_argument("--bundle", type=Path, default=None, help="model bundle (default: models/default)")
    demo.add_argument("--topic-prefix", default="leukoscope", help="MQTT topic prefix, as mqtt.topic_prefix (default: leukoscope)")

    export = commands.add_parser("export-reviews", help="write the crops reviewed on the page as a training source",
                                 description="Write the crops people labelled on the local page (web.review_db) in the "
                                             "trainer's layout: OUT/all (blast) and OUT/hem (normal), one 36 µm field per "
                                             "cell at 0.125 µm/px (declared in leukoscope-scale.json), with every label's "
                                             "provenance in provenance.jsonl. 'not a cell' and 'unsure' are left out.",
                                 epilog="Example: edge export-reviews --db /var/lib/leukoscope/reviews.sqlite3 --out site-a "
                                        "&& trainer fit --data site-a ...")
    export.add_argument("--db", type=Path, required=True, help="the device's review database (web.review_db)")
    export.add_argument("--out", type=Path, required=True, help="folder to write (must be new or empty)")
    export.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")

    check = commands.add_parser("check", help="self-test: config, bundle, camera and broker; non-zero exit on failure",
                                description="Check a device before trusting it: the config validates, the bundle verifies and "
                                            "loads, the camera gives colour frames (dark or overexposed ones are noted: the lamp "
                                            "may be off or turned up) whose red cells agree with the configured scale (within 2x), "
                                            "the outbox opens and the broker answers. One line per check; non-zero exit when any "
                                            "fails.",
                                epilog="Example: edge check --config /etc/leukoscope/leukoscope.toml")
    check.add_argument("--config", type=Path, required=True, help="agent config file (TOML)")
    return parser


def _calibrate(args: argparse.Namespace) -> int:
    from edge.calibration import calibrate, coarse_scale, drift, read_scale_file, write_scale_file, DRIFT_WARNING
    from edge.gate import FRAME_PROBLEMS

    names, frames, configured, what = _calibration_frames(args.source, args.frames)
    calibration = calibrate(frames)
    if calibration.um_per_px is None:
        unlit = Counter(f.light_problem for f in calibration.frames if f.light_problem)
        why = "; ".join(f"{count} of {len(frames)} frame(s) {FRAME_PROBLEMS[problem].doing}: {FRAME_PROBLEMS[problem].hint}"
                        for problem, count in unlit.items())
        if not why:
            blank = sum(1 for f in frames if float(f.std()) < 2.0)
            why = f"{blank} of {len(frames)} frame(s) are blank" if blank else \
                "a thick or thin film, or pre-cropped cells, show too few separate red cells"
        raise UserError(f"{args.source}: too few red cells to measure the scale ({calibration.red_cells} in {len(frames)} "
                        f"frame(s), need 3 in a frame; {why}); use other frames or set segmentation.um_per_px by hand "
                        "(stage micrometer)")
    if configured is None and args.source.is_dir():
        configured, what = read_scale_file(args.source), f"{args.source / SCALE_FILE}"
    if args.json:
        print(json.dumps({"source": str(args.source), "configured_um_per_px": configured, **calibration.to_dict(names)}))
    else:
        spread = "n/a (one frame)" if calibration.cv is None else \
            f"{calibration.cv:.1%} (robust {calibration.robust_cv:.1%}); the scale itself ±{calibration.uncertainty:.1%}"
        print(f"{calibration.um_per_px:.4f} µm per pixel: {calibration.red_cells_used} red cells in {len(calibration.usable)} of "
              f"{len(frames)} frame(s); spread between frames (CV) {spread}")
    if coarse := coarse_scale(calibration.um_per_px):
        print(f"edge: warning: {coarse}", file=sys.stderr)
    if configured is not None and drift(calibration.um_per_px, configured) > DRIFT_WARNING:
        print(f"edge: warning: measured {calibration.um_per_px:.4f} µm per pixel is "
              f"{drift(calibration.um_per_px, configured):.0%} from the configured {configured} ({what}); "
              "was the objective, camera or binning changed? set the measured value", file=sys.stderr)
    if args.write:
        if not args.source.is_dir():
            raise UserError(f"--write needs a folder of frames; {args.source} is not one")
        print(f"wrote {write_scale_file(args.source, calibration)}", file=sys.stderr)
    return 0


def _calibration_frames(source: Path, limit: int) -> tuple[list[str], list, float | None, str]:
    """(names, RGB frames, configured scale or None, where that scale comes from) for ``edge calibrate``."""
    if source.suffix.lower() == ".toml":
        from edge.agent import grab_frames
        from edge.config import load_config

        config = load_config(source)
        frames = grab_frames(config, limit)
        return [f.name for f in frames], [f.image for f in frames], config.segmentation.um_per_px, \
            f"segmentation.um_per_px in {source}"
    from edge.errors import DataError
    from edge.preprocessing import read_rgb
    from edge.sources.folder import image_files

    files = image_files(source)
    step = max(1, len(files) // limit)
    names, frames = [], []
    for path in files[::step][:limit]:
        try:
            frames.append(read_rgb(path))
            names.append(path.name)
        except DataError:
            continue
    if not frames:
        raise UserError(f"{source}: none of its {len(files)} image file(s) could be decoded; point --source at smear frames")
    return names, frames, None, ""


def _at_least_one(text: str) -> int:
    """A count option (threads, workers): a whole number of at least 1, or argparse's one-line error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is too few; give 1 or more")
    return value


def _replay(args: argparse.Namespace) -> int:
    from edge.calibration import frames_scale, mixed_sizes
    from edge.classifier import Classifier
    from edge.config import interpreter_threads
    from edge.gate import FRAME_PROBLEMS
    from edge.pipeline import Pipeline
    from edge.results import SampleTally
    from edge.segmentation import SegmentationSettings
    from edge.sources.folder import FolderSourceSettings, open_source
    from contextlib import nullcontext

    from edge.step import FrameStep, count_from_one, in_order
    from edge.workers import AnalysisProcesses

    settings = SegmentationSettings(um_per_px=frames_scale(args.source, args.um_per_px))
    classifier = Classifier(args.bundle, num_threads=interpreter_threads(args.num_threads, args.workers))
    pipeline = Pipeline(classifier, settings)
    sample_id = args.sample_id or (args.source.name if args.source.is_dir() else args.source.stem)
    tally = SampleTally(sample_id)
    printer = _ReplayPrinter(args.json, classifier.bundle.positive_label, args.annotate)
    if not args.json:
        print(f"{'frame':<36} {'cells':>5} {'blasts':>6}  p(ALL) per cell")
    with AnalysisProcesses(pipeline, args.workers) if args.processes else nullcontext() as analysers:
        step = FrameStep(pipeline, count_from_one(), [printer],  # no outbox: each replay numbers its results from 1
                         analysers.analyse if analysers else None)
        for analysis in in_order(step.analyse, open_source(FolderSourceSettings(path=args.source)), args.workers):
            step.commit(analysis, tally)
    if not tally.frames:  # a sample of nothing is not a result: say so, and fail
        raise UserError(f"{args.source}: none of its {tally.unreadable_frames} image file(s) could be read; "
                        "point --source at smear frames (JPEG, PNG, BMP or TIFF)")
    for problem, count in tally.frame_problems.items():
        print(f"edge: {count} of {tally.frames} frames {FRAME_PROBLEMS[problem].doing}: no cells are found in them; "
              f"{FRAME_PROBLEMS[problem].hint}", file=sys.stderr)
    mixed = mixed_sizes(printer.sides)
    if mixed:
        print(f"edge: warning: {args.source} mixes frame sizes ({mixed}): one scale ({settings.um_per_px} µm per pixel) sized "
              "every cell, right for one camera and objective at most; replay each one's frames from a folder of their own",
              file=sys.stderr)
    summary = tally.summary(pipeline.device_id, final=True)
    if args.json:
        print(json.dumps(summary))
    else:
        fraction = "n/a" if summary["blast_fraction"] is None else (
            f"{summary['blast_fraction']:.1%} (95% CI {summary['blast_fraction_ci95'][0]:.1%}-{summary['blast_fraction_ci95'][1]:.1%})")
        print(f"\nsample {sample_id}: {summary['frames']} frames, {summary['cells']} cells, {summary['blasts']} flagged as ALL blasts; "
              f"blast fraction {fraction}" + (f"; {summary['unreadable_frames']} unreadable frame(s) skipped" if summary["unreadable_frames"] else ""))
        if args.annotate:
            print(f"annotated frames in {args.annotate} (flagged crops in {args.annotate / 'flagged'})")
        print(DISCLAIMER)
    return 0


class _ReplayPrinter:
    """``edge replay``'s observer of the frame step: a line per frame (or its JSON), annotated frames."""

    def __init__(self, as_json: bool, positive_label: str, annotate: Path | None) -> None:
        from edge.pipeline import ReviewWriter

        self.as_json = as_json
        self.positive_label = positive_label
        self.review = ReviewWriter(annotate, positive_label) if annotate else None
        self.sides: dict[int, str] = {}  # a frame name for each longer side seen

    def analysed(self, done: Analysed) -> None:
        result = done.result
        self.sides.setdefault(max(done.frame.image.shape[:2]), done.frame.name)  # type: ignore[union-attr]
        if self.review:
            self.review.write(done.frame.image, result, done.crops)
        if self.as_json:
            print(done.payload.decode(), flush=True)
        else:
            scores = " ".join(f"{c['p_all']:.2f}{'*' if c['label'] == self.positive_label else ''}" for c in result["cells"])
            print(f"{done.frame.name[:36]:<36} {result['counts']['cells']:>5} {result['counts']['blasts']:>6}  {scores}")

    def skipped(self, frame: Frame, reason: str) -> None:
        print(f"edge: skipped {frame.name}: {reason}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)

    def command() -> int:
        if args.command == "replay":
            return _replay(args)
        if args.command == "calibrate":
            return _calibrate(args)
        if args.command == "demo":
            from edge.demo import SAMPLES, run_demo

            return run_demo(args.workdir, args.frames or SAMPLES, args.bundle, args.topic_prefix)
        if args.command == "export-reviews":
            from edge.web.export import export_reviews

            counts = export_reviews(args.db, args.out, overwrite=args.overwrite)
            print(f"wrote {sum(counts['exported'].values())} crops to {args.out} ({counts['exported']}); "
                  f"left out {counts['left_out'] or 'none'}")
            return 0
        if args.command == "run":
            from edge import agent

            return agent.run(args.config)
        from edge import selftest

        return selftest.check(args.config)

    return run_command(command, "edge")


if __name__ == "__main__":
    sys.exit(main())
