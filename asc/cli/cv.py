"""``asc cv``: k-fold cross-validation, one ordinary run per held-out fold."""

from __future__ import annotations

import argparse
from pathlib import Path

from asc.cli.common import EXIT_OK, Subparsers, add_command


def _cv(args: argparse.Namespace) -> int:
    from asc.config import RunConfig, load_config
    from asc.cv import cross_validate

    config = load_config(RunConfig, args.config, args.overrides)
    result = cross_validate(config, args.out, progress=not args.quiet)
    summary = result.to_dict()
    mean, std = summary["mean"], summary["std"]
    print(f"{args.out}: {len(result.folds)} folds, accuracy {100 * mean['accuracy']:.1f} ± "
          f"{100 * std['accuracy']:.1f} %, macro accuracy {100 * mean['macro_accuracy']:.1f} ± "
          f"{100 * std['macro_accuracy']:.1f} %, log loss {mean['log_loss']:.3f} ± {std['log_loss']:.3f} "
          f"(table: {args.out / 'cv.md'}, out-of-fold predictions: {args.out / 'oof_predictions.csv'})")
    return EXIT_OK


ORDER = 25  #: place in `asc --help`, after train/evaluate


def register(sub: Subparsers) -> None:
    cv = add_command(
        sub, "cv", _cv, help="k-fold cross-validation: one run per held-out fold, mean ± std table",
        description="Train one ordinary run per fold of the collection (OUT/fold-N), each evaluated on the fold "
        "it did not train on, and write OUT/cv.md and cv.json (per-fold and mean ± std accuracy, macro accuracy "
        "and log loss, per class) and OUT/oof_predictions.csv (the fold each clip was tested in, its label, the "
        "prediction and every probability). Folds are a table's data.fold_column, or data.num_folds seeded, "
        "stratified folds for a collection without a split. Re-running the same command after a kill skips "
        "finished folds and resumes a stopped one. See docs/datasets.md.")
    cv.add_argument("--config", type=Path, default=None, help="YAML config file")
    cv.add_argument("--out", type=Path, required=True, help="cross-validation folder (one run folder per fold)")
    cv.add_argument("overrides", nargs="*", metavar="key=value",
                    help="config overrides, e.g. data.root=meta.csv data.fold_column=fold")
