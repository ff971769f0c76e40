"""``quantize``: export, inspect and evaluate int8 model bundles for the leukoscope device."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edge import DISCLAIMER, __version__
from edge.console import run_command, setup_logging
from edge.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quantize", description="Turn a trained run into a verified int8 model bundle for the device. " + DISCLAIMER)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, with the converter's and frameworks' output")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    export = commands.add_parser("export", help="full-integer int8 TFLite bundle from a run, parity measured",
                                 description="Quantize a `trainer fit` run to int8 (uint8 in/out), measure float-vs-int8 parity "
                                             "on the run's validation patients, and write a bundle the device verifies.",
                                 epilog="Example: quantize export runs/edge --out bundles/edge --edgetpu")
    export.add_argument("run", type=Path, help="run folder written by `trainer fit`")
    export.add_argument("--out", type=Path, required=True,
                        help="bundle folder to write; it appears only when the bundle is complete (refused if not empty)")
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty --out once the new bundle is complete")
    export.add_argument("--calibration", metavar="DIR[=UM_PER_PX]", help="data source for calibration (default: the run's training patients)")
    export.add_argument("--samples", type=int, default=300, help="calibration crops, stratified by class and patient (default 300)")
    export.add_argument("--data", dest="eval_data", metavar="DIR[=UM_PER_PX]",
                        help="data source for parity (default: the run's validation patients)")
    export.add_argument("--edgetpu", action="store_true", help="check Edge TPU rules and compile with edgetpu_compiler if installed")
    export.add_argument("--min-agreement", type=float, default=0.98, help="least float-vs-int8 decision agreement (default 0.98)")
    export.add_argument("--max-auc-drop", type=float, default=0.01, help="largest allowed AUC loss from int8 (default 0.01)")
    export.add_argument("--accept-parity-loss", action="store_true", help="write the bundle even if parity is below the limits")
    export.add_argument("--cv", type=Path, default=None, metavar="DIR",
                        help="a `trainer cv` folder of the same recipe: its new-patient estimate goes into the model card")
    export.add_argument("--float-twin", action="store_true", help="also write model_float.tflite (not part of the verified bundle) for benchmarks")
    carried = export.add_mutually_exclusive_group()
    carried.add_argument("--splitter-from", type=Path, metavar="BUNDLE",
                         help="take over BUNDLE's cell splitter, which does not depend on the classifier (default: the "
                              "shipped models/default's; without one the device splits touching cells the classical way)")
    carried.add_argument("--no-splitter", action="store_true", help="write the bundle without a cell splitter")

    inspect = commands.add_parser("inspect", help="manifest, tensors, operators and Edge TPU verdict of a bundle",
                                  description="Verify a bundle as the device does, then show its manifest, input and output "
                                              "tensors with their quantization, file sizes, operators and whether they all "
                                              "map to the Edge TPU.",
                                  epilog="Example: quantize inspect bundles/edge")
    _add_bundle(inspect)
    inspect.add_argument("--json", action="store_true", help="print one JSON object")

    evaluate = commands.add_parser("evaluate", help="metrics of a bundle's int8 model on a data folder (the device's interpreter code)",
                                   description="Score cells of a data folder with the bundle's int8 model through the device's "
                                               "own classifier, at the bundle's threshold; warns when the cells include the "
                                               "source run's training patients.",
                                   epilog="Example: quantize evaluate bundles/edge --data ../shared/data/cnmc-test")
    _add_bundle(evaluate)
    evaluate.add_argument("--data", action="append", required=True, metavar="DIR[=UM_PER_PX]",
                          help="data source in the trainer's layouts, with the same scale rules; repeat for several")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    evaluate.add_argument("--num-threads", type=int, default=2, help="interpreter threads (default 2)")

    splitter = commands.add_parser("splitter", help="add a `trainer splitter` model, int8, to a bundle",
                                   description="Quantize the cell splitter of a `trainer splitter` run to int8, check that it "
                                               "finds the same cells as the float model on the run's held-out clusters, and "
                                               "add it to the bundle (manifest and model card rewritten; a splitter already "
                                               "there is replaced). The device then splits touching cells with it.",
                                   epilog="Example: quantize splitter models/default --run runs/splitter")
    _add_bundle(splitter)
    splitter.add_argument("--run", type=Path, required=True, help="run folder written by `trainer splitter`")

    keygen = commands.add_parser("keygen", help="make the Ed25519 key that signs model updates",
                                 description="Write a new Ed25519 private key (PEM, mode 0600) and print its public half, "
                                             "which goes into each device's config as updates.public_key.",
                                 epilog="Example: quantize keygen --out ~/.config/leukoscope/update-signing.pem")
    keygen.add_argument("--out", type=Path, required=True, help="private key file to write (refused if it exists)")

    selftest = commands.add_parser("selftest", help="record self-test crops and their scores in a bundle",
                                   description="Score cells of a data folder with the bundle and record a few of them, "
                                               "with their scores, in the bundle: a device scores them again before it "
                                               "switches to a bundle sent by `quantize publish`. `quantize export` does this itself.",
                                   epilog="Example: quantize selftest models/default --data ../shared/data/cnmc-dev")
    _add_bundle(selftest)
    selftest.add_argument("--data", action="append", required=True, metavar="DIR[=UM_PER_PX]", help="data source with cells")

    for name, text in (("publish", "sign a bundle and send it to devices over MQTT"), ("revert", "switch devices back to their previous bundle")):
        command = commands.add_parser(name, help=text, description=(
            "Sign the bundle with --key and send it in chunks, each with its hash, to the devices over MQTT. Each device "
            "checks the signature against its updates.public_key, stages and self-tests the bundle, switches to it "
            "atomically and answers; a refusal leaves the device as it was." if name == "publish" else
            "Ask devices to switch back to the bundle they ran before the last update."),
            epilog=f"Example: quantize {name} {'bundles/edge --key signing.pem ' if name == 'publish' else ''}--to pi-lab-1 --host broker.lab")
        if name == "publish":
            _add_bundle(command)
            command.add_argument("--key", type=Path, required=True, help="Ed25519 private key from `quantize keygen`")
        target = command.add_mutually_exclusive_group(required=True)
        target.add_argument("--to", action="append", metavar="DEVICE", help="device id (repeat for several)")
        target.add_argument("--all", action="store_true", help="every device whose retained status on the broker is online")
        command.add_argument("--host", default="localhost", help="MQTT broker (default localhost)")
        command.add_argument("--port", type=int, default=1883, help="MQTT port (default 1883)")
        command.add_argument("--topic-prefix", default="leukoscope", help="the devices' mqtt.topic_prefix (default leukoscope)")
        command.add_argument("--username", help="MQTT user name")
        command.add_argument("--password-file", type=Path, help="file holding the MQTT password")
        command.add_argument("--ca", type=Path, help="CA certificate for TLS to the broker")
        command.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each device's answer (default 120)")
    return parser


def _add_bundle(parser: argparse.ArgumentParser) -> None:
    """The bundle as a positional (the thing the command is about) or as ``--bundle``, the name
    ``edge replay`` gives it, so that neither spelling is wrong."""
    parser.add_argument("bundle", type=Path, nargs="?", help="bundle folder written by `quantize export` (or --bundle)")
    parser.add_argument("--bundle", dest="bundle_option", type=Path, metavar="BUNDLE", help="the same, as in `edge replay`")


def _bundle(args: argparse.Namespace) -> Path:
    if args.bundle and args.bundle_option and args.bundle != args.bundle_option:
        raise UserError(f"two bundles given ({args.bundle} and --bundle {args.bundle_option}); give one")
    if not (args.bundle or args.bundle_option):
        raise UserError(f"no bundle given; quantize {args.command} BUNDLE (or --bundle BUNDLE)")
    return args.bundle or args.bundle_option


def inspect_bundle(path: Path) -> dict:
    from edge.bundle import load_bundle
    from edge.interpreter import open_interpreter
    from quantize import edgetpu

    bundle = load_bundle(path)
    interpreter = open_interpreter(str(bundle.model_path("cpu")), plain_ops=True)
    verdict = edgetpu.check(interpreter)
    tensors = {role: [{"name": d["name"], "shape": [int(x) for x in d["shape"]], "dtype": getattr(d["dtype"], "__name__", str(d["dtype"])),
                       "quantization": list(d["quantization"])} for d in details]
               for role, details in (("inputs", interpreter.get_input_details()), ("outputs", interpreter.get_output_details()))}
    return {"bundle": str(path), "manifest": bundle.manifest, "tensors": tensors,
            "ops": [op["op_name"] for op in interpreter._get_ops_details()], "edgetpu_check": verdict,
            "size_bytes": {name: (path / name).stat().st_size for name in bundle.manifest["files"]}}


def evaluate_bundle(path: Path, data: list[str], num_threads: int) -> dict:
    import numpy as np

    from edge.classifier import Classifier
    from trainer.dataset import load_arrays, scan_sources
    from trainer import metrics as M
    from trainer.fit import by_group, seen_in_training

    classifier = Classifier(path, num_threads=num_threads)
    images, samples = load_arrays(scan_sources(data, require_both=False)[0], classifier.contract)
    from edge.console import progress

    scores = np.concatenate([classifier.scores(images[i:i + 64]) for i in progress(range(0, len(images), 64), desc="evaluate", unit="batch")])
    result = M.compute([s.label for s in samples], scores, classifier.threshold, [s.patient for s in samples])
    source_run = classifier.bundle.manifest.get("provenance", {}).get("source_run")
    result.update({"by_group": by_group(samples, scores, classifier.threshold), "bundle": str(path), "data": data,
                   "seen_in_training": seen_in_training(Path(source_run), samples) if source_run else None})
    return result


def _publish(args: argparse.Namespace) -> int:
    from edge.config_files import read_password
    from quantize import publish

    signed = publish.sign_bundle(_bundle(args), publish.load_key(args.key)) if args.command == "publish" else None
    password = read_password(args.password_file, "--password-file")
    sender = publish.Sender(args.host, args.port, args.topic_prefix, username=args.username, password=password, tls_ca=args.ca)
    try:
        devices = args.to or sender.devices()
        if not devices:
            raise UserError(f"no device is online under {args.topic_prefix}/+/status; name them with --to")
        outcomes = publish.publish(sender, signed, devices, args.timeout) if signed else publish.revert(sender, devices, args.timeout)
    finally:
        sender.close()
    for o in outcomes:
        if o.ok:
            state = "already active" if o.reply.get("unchanged") else f"active {o.reply.get('active')}, previous {o.reply.get('previous')}"
            print(f"{o.device}: {state} ({o.seconds:.1f} s)")
        else:
            print(f"{o.device}: REFUSED: {o.reply.get('error')}")
    return 0 if all(o.ok for o in outcomes) else 1


def _splitter_line(record: dict | None) -> str:
    """What a bundle's manifest says about its cell splitter, in one line."""
    if not record:
        return "splitter none: touching cells are split by the classical rule (add one with `quantize splitter`)"
    carried = record.get("provenance", {}).get("carried_from")
    return (f"splitter {record['file']} ({record['contract']}, {record['um_per_px']} µm/px): held-out clusters "
            f"{record['held_out']['rate']:.3f} found on their own" + (f"; taken over from {carried}" if carried else ""))


def _splitter_source(args: argparse.Namespace) -> Path | None:
    """The bundle whose splitter ``export`` takes over: --splitter-from, else the shipped bundle's when it has
    one (a checkout or installed copy without models/ has none to give), else None."""
    if args.no_splitter:
        return None
    if args.splitter_from is not None:
        return args.splitter_from
    from edge.assets import DEFAULT_BUNDLE
    from edge.bundle import MANIFEST

    try:
        return DEFAULT_BUNDLE if "splitter" in json.loads((DEFAULT_BUNDLE / MANIFEST).read_text()) else None
    except (OSError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)

    def command() -> int:
        if args.command == "export":
            from quantize.export import ExportOptions, export

            manifest = export(args.run, args.out, ExportOptions(
                calibration=args.calibration, samples=args.samples, eval_data=args.eval_data, edgetpu=args.edgetpu,
                min_agreement=args.min_agreement, max_auc_drop=args.max_auc_drop, accept_parity_loss=args.accept_parity_loss,
                overwrite=args.overwrite, float_twin=args.float_twin, cv=args.cv, splitter_from=_splitter_source(args)))
            p = manifest["metrics"]["parity"]
            print(f"bundle written to {args.out} ({(args.out / 'model_int8.tflite').stat().st_size / 1024:.0f} KiB int8)")
            print(f"parity on {p['images']} cells: decision agreement {p['decision_agreement']:.4f}, "
                  f"AUC float {p['float']['roc_auc'] or float('nan'):.3f} vs int8 {p['int8']['roc_auc'] or float('nan'):.3f}"
                  + ("" if p["passed"] else "  (BELOW LIMITS, accepted by --accept-parity-loss)"))
            tpu = manifest["edgetpu"]
            print(f"Edge TPU: {'compatible' if tpu['compatible'] else 'NOT compatible: ' + '; '.join(tpu['problems'])}; "
                  + (f"compiled {tpu['file']} ({tpu['ops_on_edgetpu']} ops on the Edge TPU)" if tpu.get("compiled") else tpu["reason"]))
            print(_splitter_line(manifest.get("splitter")))
        elif args.command == "inspect":
            args.bundle = _bundle(args)
            info = inspect_bundle(args.bundle)
            if args.json:
                print(json.dumps(info))
            else:
                m = info["manifest"]
                print(f"bundle {args.bundle}: format v{m['format_version']}, {m['provenance']['model_kind']} model, labels {m['labels']} (positive {m['positive_label']})")
                print(f"input  {info['tensors']['inputs'][0]['shape']} {info['tensors']['inputs'][0]['dtype']} q={info['tensors']['inputs'][0]['quantization']}, "
                      f"preprocessing {m['preprocessing']['name']}, {m['input']['color_order']}")
                print(f"output {info['tensors']['outputs'][0]['shape']} {info['tensors']['outputs'][0]['dtype']} q={info['tensors']['outputs'][0]['quantization']}, threshold {m['threshold']:.3f}")
                print("files  " + ", ".join(f"{k} ({v / 1024:.0f} KiB)" for k, v in info["size_bytes"].items()))
                print("ops    " + ", ".join(f"{k} x{v}" for k, v in info["edgetpu_check"]["op_counts"].items()))
                verdict = info["edgetpu_check"]
                print("Edge TPU: " + ("compatible" if verdict["compatible"] else "; ".join(verdict["problems"])))
                print(_splitter_line(m.get("splitter")))
        elif args.command == "splitter":
            from quantize.splitter import add_splitter

            bundle = _bundle(args)
            record = add_splitter(args.run, bundle)["splitter"]
            parity, held = record["parity"], record["held_out"]
            print(f"splitter added to {bundle}: held-out clusters {held['rate']:.3f} of cells found on their own (float); "
                  f"int8 finds as many cells as float in {parity['same_cell_count']:.1%} of {parity['held_out_fields']} fields")
        elif args.command == "keygen":
            from quantize.publish import keygen

            public = keygen(args.out)
            print(f"private key written to {args.out} (keep it on the workstation)")
            print(f"devices' config: [updates]\nenabled = true\npublic_key = \"{public}\"")
        elif args.command == "selftest":
            from quantize.publish import selftest_from_data

            bundle = _bundle(args)
            manifest = selftest_from_data(bundle, args.data)
            record = manifest["selftest"]
            print(f"self-test of {len(record['scores'])} crops recorded in {bundle} (tolerance {record['tolerance']:.4f})")
        elif args.command in ("publish", "revert"):
            return _publish(args)
        else:
            from trainer.fit import seen_warning

            result = evaluate_bundle(_bundle(args), args.data, args.num_threads)
            warning = seen_warning(result, "the bundle's source run")
            if warning:
                print(f"quantize: warning: {warning}", file=sys.stderr)
            if args.json:
                print(json.dumps(result))
            else:
                from trainer.metrics import summary_line

                print(f"{result['images']} cells: {summary_line(result)}")
        return 0

    return run_command(command, "quantize")


if __name__ == "__main__":
    sys.exit(main())
