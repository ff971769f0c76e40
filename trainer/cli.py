"""``trainer``: train and evaluate leukoscope models on C-NMC crops, split by patient."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edge import DISCLAIMER, __version__, in_words
from edge.console import run_command, setup_logging
from edge.errors import UserError
from trainer import default_input_size
from trainer import splitter as splitter_recipe  # its defaults are the command's (no Keras at import)
from trainer.metrics import summary_line


def _add_training_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", action="append", required=True, metavar="DIR[=UM_PER_PX]",
                        help="a data source; repeat for several. C-NMC crops (DIR/{all,hem}/*.png or the download's "
                             "C-NMC_Leukemia/training_data/fold_*/{all,hem}/*.bmp) or cell-type folders "
                             "(DIR/{lymphocyte,monocyte,...,blast}/*.jpg, e.g. PBC). Its scale: =UM_PER_PX, a "
                             "leukoscope-scale.json in DIR, C-NMC's reference, or measured on the images' red cells")
    parser.add_argument("--bccd", default=None, metavar="DIR",
                        help="BCCD-layout smear frames (JPEGImages/ + Annotations/) scored as a lab never trained on")
    parser.add_argument("--compose-share", type=float, default=0.5, metavar="F",
                        help="share of C-NMC cells put on smear backgrounds (from the cell-type sources) and cut by the "
                             "device's smear path, so the way a cell was cut cannot tell its source (default 0.5; 0: off)")
    parser.add_argument("--leave-out-type", default=None, metavar="TYPE",
                        help="hold one cell type (e.g. lymphocyte) out of training entirely and report how often it is called ALL")
    parser.add_argument("--out", type=Path, required=True,
                        help="run folder to write; it appears only when the run is complete (refused if not empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out once the new run is complete")
    parser.add_argument("--model", choices=["edge", "seed"], default="edge",
                        help="edge: the small int8/Edge-TPU model (default); seed: the published 30.6M-parameter CNN, the baseline")
    parser.add_argument("--epochs", type=int, default=None,
                        help="maximum epochs; early stopping on validation AUC (default 40; with --finetune: exactly this many, default 6)")
    parser.add_argument("--image-size", type=int, default=None, help=f"input side in pixels (default: edge {default_input_size('edge')}, the crop contract's; "
                        f"seed {default_input_size('seed')}, the published CNN's)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for the split, initialisation and augmentation (default 0)")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="share of patients for validation (default 0.2)")
    parser.add_argument("--patience", type=int, default=10, help="epochs without validation AUC gain before stopping (default 10)")
    parser.add_argument("--steps-per-epoch", type=int, default=None, help="limit steps per epoch (smoke tests); default one pass over the data")
    parser.add_argument("--time-budget", type=float, default=None, metavar="MIN",
                        help="stop after the epoch that crosses this many minutes (compare models at equal training time)")
    parser.add_argument("--max-type-false-blast", type=float, default=0.05, metavar="SHARE",
                        help="raise the decision threshold until no normal cell type of another source (PBC's lymphocytes, "
                             "monocytes, ...) is called ALL on more than this share of its validation cells "
                             "(default 0.05; 1 turns it off)")
    parser.add_argument("--patient-power", type=float, default=1.0, metavar="P",
                        help="share a cell type's loss between its patients as (cells ** P): 1 weighs every cell alike "
                             "(default); 0, one share per patient. 0.5 lowered new-patient AUC in every CV fold (README)")
    parser.add_argument("--source-adversary", type=float, default=0.0, metavar="W",
                        help="domain-adversarial training: a head guesses the source of cells of one kind held by several "
                             "sources (C-NMC's normal B-cells, PBC's lymphocytes) and the model is trained, with strength W, "
                             "to make it fail, so its features stop naming the lab (edge model; default 0: off). Measured "
                             "at 1 and 3 on one CV fold: lower new-patient AUC, the leak barely narrowed (README)")
    parser.add_argument("--weight-average", type=float, default=0.0, metavar="M",
                        help="validate and keep an exponential moving average of the weights with momentum M (Polyak "
                             "averaging; e.g. 0.995, about the last 200 steps) instead of the last step's (default 0: off). "
                             "Measured on 3 CV folds: the same new-patient AUC (README)")
    parser.add_argument("--allow-collapse", action="store_true",
                        help="write the run even if the model gives one answer for everything (otherwise an error)")


def _config(args: argparse.Namespace):
    from trainer.fit import FitConfig

    if args.epochs is None:
        args.epochs = 40
    for name in ("epochs", "batch_size", "patience"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 < args.val_fraction < 0.5:
        raise UserError("--val-fraction must be between 0 and 0.5")
    if not 0 <= args.compose_share <= 1:
        raise UserError("--compose-share must be between 0 and 1")
    if not 0 < args.max_type_false_blast <= 1:
        raise UserError("--max-type-false-blast must be above 0 and at most 1 (1 turns the cap off)")
    if not 0 <= args.patient_power <= 1:
        raise UserError("--patient-power must be between 0 (one share per patient) and 1 (one per cell)")
    if not 0 <= args.source_adversary <= 10:
        raise UserError("--source-adversary must be between 0 (off) and 10")
    if not 0 <= args.weight_average < 1:
        raise UserError("--weight-average must be 0 (off) or a momentum below 1, e.g. 0.995")
    if args.source_adversary and args.model != "edge":
        raise UserError("--source-adversary works with the edge model only (it reads its pooled features); leave it out for --model seed")
    return FitConfig(model=args.model, epochs=args.epochs, image_size=args.image_size, batch_size=args.batch_size,
                     seed=args.seed, val_fraction=args.val_fraction, test_fraction=getattr(args, "test_fraction", 0.0),
                     patience=args.patience, steps_per_epoch=args.steps_per_epoch, allow_collapse=args.allow_collapse,
                     time_budget_min=args.time_budget, bccd=args.bccd, leave_out_type=args.leave_out_type,
                     compose_share=args.compose_share, patient_power=args.patient_power,
                     source_adversary=args.source_adversary, weight_average=args.weight_average,
                     max_type_false_blast=None if args.max_type_false_blast >= 1 else args.max_type_false_blast)


#: ``fit`` options that RUN fixes or that mean nothing for a fine-tune, refused when given with --finetune.
_NOT_WITH_FINETUNE = {"image_size": None, "model": "edge", "bccd": None, "leave_out_type": None, "test_fraction": 0.0,
                      "compose_share": 0.5, "val_fraction": 0.2, "patience": 10, "max_type_false_blast": 0.05,
                      "patient_power": 1.0, "source_adversary": 0.0, "weight_average": 0.0}


def _finetune(args: argparse.Namespace) -> dict:
    from trainer.finetune import FinetuneConfig, finetune

    for name, default in _NOT_WITH_FINETUNE.items():
        if getattr(args, name) != default:
            raise UserError(f"--{name.replace('_', '-')} cannot be used with --finetune: the run fixes it or it has no "
                            "meaning for a fine-tune; leave it out")
    epochs = 6 if args.epochs is None else args.epochs
    if epochs < 1 or args.batch_size < 1:
        raise UserError("--epochs and --batch-size must be at least 1")
    if args.replay_ratio < 0:
        raise UserError("--replay-ratio must be 0 or more")
    config = FinetuneConfig(epochs=epochs, learning_rate=args.learning_rate, batch_size=args.batch_size, seed=args.seed,
                            replay_ratio=args.replay_ratio, steps_per_epoch=args.steps_per_epoch,
                            time_budget_min=args.time_budget, allow_collapse=args.allow_collapse)
    return finetune(args.finetune, args.data, args.out, config, overwrite=args.overwrite)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trainer",
        description="Train leukoscope's ALL-vs-normal cell classifier with patient-disjoint splits. " + DISCLAIMER,
        epilog="Example: trainer fit --data ../shared/data/cnmc-dev --data ../shared/data/pbc-normal "
               "--bccd ../shared/data/bccd --out runs/edge",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, with the frameworks' output")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    fit = commands.add_parser("fit", help="train one model on a patient split and write a run folder",
                              description="Train on a patient-disjoint split; writes the model, metrics, plots and report.",
                              epilog="Example: trainer fit --data ../shared/data/cnmc-dev --out runs/edge; to adapt it to a site: "
                                     "trainer fit --finetune runs/edge --data site-reviews --out runs/edge-site")
    _add_training_options(fit)
    fit.add_argument("--test-fraction", type=float, default=0.0,
                     help="also hold out this share of patients as a test split never used for training or threshold (default 0)")
    tune = fit.add_argument_group(
        "fine-tuning to a site (--finetune RUN)",
        "Start from RUN's model and adapt it to one lab's microscope with the cells its people reviewed "
        "(`edge export-reviews --out DIR`, passed as --data DIR): a few epochs at a low learning rate, batch norm "
        "frozen, the site's cells mixed with a replay of RUN's own training cells (read from its split.json) so "
        "blasts are not forgotten. RUN's threshold is kept unless the site's held-out patients hold 50 cells of each "
        "class. Writes a normal run folder (config.json records finetuned_from) for `quantize export`.")
    tune.add_argument("--finetune", type=Path, default=None, metavar="RUN", help="run folder written by `trainer fit` to start from")
    tune.add_argument("--learning-rate", type=float, default=1e-4, help="with --finetune: Adam learning rate (default 1e-4)")
    tune.add_argument("--replay-ratio", type=float, default=3.0,
                      help="with --finetune: RUN training cells replayed per site cell, at least 200 (default 3)")

    cv = commands.add_parser("cv", help="grouped k-fold cross-validation: estimate performance on new patients",
                             description="Each fold leaves whole patients out and scores the model on them; "
                                         "reports per-fold metrics and their spread in cv.json and cv_report.md.",
                             epilog="Example: trainer cv --data ../shared/data/cnmc-dev --folds 5 --out runs/edge-cv")
    _add_training_options(cv)
    cv.add_argument("--folds", type=int, default=5, help="number of folds (default 5)")
    cv.add_argument("--only-fold", type=int, action="append", default=None, metavar="K",
                    help="run fold K only (0-based; repeat for several) of the same split a full run draws: spread a "
                         "cross-validation over machines, or compare a recipe on chosen folds; cv.json says which ran")

    splitter = commands.add_parser(
        "splitter", help="train the device's cell splitter on clusters composed from real cells",
        description="Compose clusters of 1-8 touching real cells (C-NMC cells and smear cells of half the images, by a hash "
                    "of the file name) on smear fields with their white cells painted out, train the small model that tells "
                    "touching cells apart (edge/splitter.py), and measure it on clusters of the other half. Writes "
                    "splitter.keras, calibration fields and splitter.json; `quantize splitter RUN --bundle B` puts it, int8, "
                    "in a bundle. Takes ~11 min on 2 cores with the defaults.",
        epilog="Example: trainer splitter --data ../shared/data/cnmc-dev --data ../shared/data/pbc-normal --out runs/splitter")
    splitter.add_argument("--data", action="append", required=True, metavar="DIR[=UM_PER_PX]",
                          help="cell sources (same layouts and scale rules as fit); at least one smear source in the "
                               "cell-type layout (its images give the fields)")
    splitter.add_argument("--out", type=Path, required=True, help="run folder to write (refused if not empty)")
    splitter.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    splitter.add_argument("--clusters", type=int, default=splitter_recipe.CLUSTERS,
                          help=f"composed training clusters (default {splitter_recipe.CLUSTERS})")
    splitter.add_argument("--epochs", type=int, default=splitter_recipe.EPOCHS,
                          help=f"epochs of 100 batches of 8 (default {splitter_recipe.EPOCHS})")
    splitter.add_argument("--cells", type=int, default=splitter_recipe.CELLS,
                          help="distinct cells cut to compose from, 4/5 for training and 1/5 held out, as many C-NMC as "
                               f"smear cells where there are enough (default {splitter_recipe.CELLS})")
    splitter.add_argument("--absorb-share", type=float, default=0.0,
                          help="share of clusters whose cells filter the light where they overlap instead of being pasted "
                               "over each other (default 0)")
    splitter.add_argument("--restain", action="store_true",
                          help="also vary white balance, exposure, stain hue and strength, focus, noise and scale (+-10%%) "
                               "in training (measured: no gain on another lab's fields; off by default)")
    splitter.add_argument("--seed", type=int, default=0, help="random seed (default 0)")

    evaluate = commands.add_parser("evaluate", help="metrics of a run's model on a data folder",
                                   description="Score a run's saved model, at its stored threshold, on any data folder of the "
                                               "supported layouts; warns when the cells include the run's training patients.",
                                   epilog="Example: trainer evaluate runs/edge --data ../shared/data/cnmc-test")
    evaluate.add_argument("run", type=Path, help="run folder written by `trainer fit`")
    evaluate.add_argument("--data", action="append", required=True, metavar="DIR[=UM_PER_PX]",
                          help="data source (same layouts and scale rules as fit); repeat for several")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return parser


def _print_metrics(result: dict) -> None:
    for name in ("validation", "test"):
        if name in result:
            print(f"{name:>10}: {summary_line(result[name])}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)

    def command() -> int:
        from trainer import fit as F

        if args.command == "fit" and args.finetune is not None:
            result = _finetune(args)
            _print_metrics(result)
            print(f"threshold {result['threshold']:.3f}: {result['threshold_rule']}")
            print(f"run written to {args.out} (report: {args.out / 'report.md'})")
        elif args.command == "fit":
            result = F.fit(args.data, args.out, _config(args), overwrite=args.overwrite)
            _print_metrics(result)
            for name, group in result.get("validation_by_group", {}).items():
                print(f"{in_words(name):>28}: {group['cells']:>5} cells, {group['called_all']:.1%} called ALL")
            if "bccd" in result:
                print(f"{'BCCD (never trained on)':>28}: {result['bccd']['white_cells_found']:>5} cells, "
                      f"{result['bccd']['false_blast_rate']:.1%} called ALL")
            print(f"run written to {args.out} (report: {args.out / 'report.md'})")
        elif args.command == "cv":
            if args.only_fold and not all(0 <= k < args.folds for k in args.only_fold):
                raise UserError(f"--only-fold must be between 0 and {args.folds - 1} (folds count from 0)")
            summary = F.cross_validate(args.data, args.out, _config(args), args.folds, overwrite=args.overwrite,
                                       only=sorted(set(args.only_fold)) if args.only_fold else None)
            for key, v in summary["summary"].items():
                print(f"{key:>16}: {v['mean']:.3f} +- {v['std']:.3f} (min {v['min']:.3f}, max {v['max']:.3f})")
            print(f"cross-validation written to {args.out / 'cv.json'}")
        elif args.command == "splitter":
            from trainer.dataset import scan_sources
            from trainer.splitter import METRICS_FILE, train_splitter

            if args.clusters < 8 or args.epochs < 1 or args.cells < 20 or not 0 <= args.absorb_share <= 1:
                raise UserError("--clusters must be at least 8, --epochs at least 1, --cells at least 20 and --absorb-share "
                                "between 0 and 1")
            if args.out.is_dir() and any(args.out.iterdir()) and not args.overwrite:
                raise UserError(f"{args.out} is not empty; choose another --out or pass --overwrite")
            samples, _ = scan_sources(args.data, require_both=False)
            metrics = train_splitter(samples, args.out, clusters=args.clusters, epochs=args.epochs, seed=args.seed,
                                     cells=args.cells, absorb_share=args.absorb_share, restain=args.restain)
            held = metrics["held_out"]
            print(f"held-out clusters: {held['found_alone']} of {held['cells']} cells found on their own ({held['rate']:.3f})")
            print(f"splitter written to {args.out} (metrics: {args.out / METRICS_FILE}); "
                  f"next: quantize splitter {args.out} --bundle BUNDLE")
        else:
            result = F.evaluate(args.run, args.data)
            warning = F.seen_warning(result, "the run")
            if warning:
                print(f"trainer: warning: {warning}", file=sys.stderr)
            if args.json:
                json.dump(result, sys.stdout)
                print()
            else:
                print(f"{result['images']} cells: {summary_line(result)}")
        return 0

    return run_command(command, "trainer")


if __name__ == "__main__":
    sys.exit(main())
