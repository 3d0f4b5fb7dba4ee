"""``asc train`` and ``asc evaluate``."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from asc.cli.common import Subparsers, add_command


def _train(args: argparse.Namespace) -> int:
    from asc.config import RunConfig, load_config
    from asc.errors import ConfigError
    from asc.train.loop import Trainer

    if args.resume is not None:
        if args.config or args.overrides or args.out:
            raise ConfigError("--resume RUN continues a run with its own config.yaml; "
                              "drop --config, --out and key=value overrides")
        run_dir = args.resume
        config = load_config(RunConfig, run_dir / "config.yaml")
        if not (run_dir / "checkpoints" / "last.pt").is_file():
            raise ConfigError(f"{run_dir}: no checkpoints/last.pt to resume from; start it again with --out")
    else:
        config = load_config(RunConfig, args.config, args.overrides)
        run_dir = args.out or Path("runs") / time.strftime("train-%Y%m%d-%H%M%S")
        if (run_dir / "checkpoints" / "last.pt").exists():
            raise ConfigError(f"{run_dir}: already holds a run; continue it with --resume {run_dir} "
                              "or choose another --out")
    metrics = Trainer(config, run_dir, progress=not args.quiet).fit(resume=args.resume is not None)
    if metrics is not None:
        print(f"{run_dir}: accuracy {100 * metrics.accuracy:.1f} %, macro accuracy "
              f"{100 * metrics.macro_accuracy:.1f} %, log loss {metrics.log_loss:.3f} "
              f"(report: {run_dir / 'report.md'})")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from asc.bundle_manifest import MANIFEST_NAME
    from asc.errors import AscError, ConfigError
    from asc.report import write_report

    if args.out is not None and ((args.out / "checkpoints").is_dir() or (args.out / MANIFEST_NAME).is_file()):
        raise ConfigError(f"{args.out}: is a run or bundle folder, whose report the evaluation would replace; "
                          "give --out a folder of its own")
    if not args.run.is_dir():
        raise AscError(f"{args.run}: no such run or bundle folder; check the path")
    if (args.run / MANIFEST_NAME).is_file():  # torch-free: the app's view of a shipped bundle
        from asc.bundle_eval import evaluate_bundle
        from asc.config import DataConfig, override_data

        if args.data is None:
            raise ConfigError(f"{args.run}: a bundle carries no dataset; give --data ROOT")
        data = override_data(DataConfig(), args.overrides, root=str(args.data),
                             **({"missing_audio": "skip"} if args.skip_missing else {}))
        metrics = evaluate_bundle(args.run, data, split=args.split or data.eval_split, progress=not args.quiet)
        checkpoint = "bundle"
        default_out = args.run.with_name(f"{args.run.name}-eval-{args.split or 'evaluate'}")  # bundles stay as shipped
    else:
        from asc.train.evaluate import evaluate_run

        metrics = evaluate_run(args.run, data_root=args.data, data_overrides=args.overrides, split=args.split,
                               checkpoint=args.checkpoint, skip_missing=args.skip_missing, progress=not args.quiet)
        checkpoint = args.checkpoint
        default_out = args.run / f"eval-{args.split or 'default'}-{checkpoint}"
    out = args.out or default_out
    write_report(out, metrics, extra={"run": str(args.run), "data": str(args.data or "run's own data"),
                                      "data_options": " ".join(args.overrides) or "-",
                                      "split": args.split or "default", "checkpoint": checkpoint},
                 title=f"Evaluation of {args.run.name}")
    print(f"{args.run}: {metrics.n} clips, accuracy {100 * metrics.accuracy:.1f} %, macro accuracy "
          f"{100 * metrics.macro_accuracy:.1f} %, log loss {metrics.log_loss:.3f}")
    for group, score in metrics.per_group.items():
        print(f"  {group:>7}: accuracy {100 * score.accuracy:.1f} % ({score.n} clips)")
    print(f"report: {out / 'report.md'}")
    return 0


ORDER = 20  #: place in `asc --help`


def register(sub: Subparsers) -> None:
    train = add_command(
        sub, "train", _train, help="train a model and write a run folder",
        description="Train a model. Settings come from defaults, then --config FILE, then key=value "
        "overrides (e.g. model.args.width=80 optim.lr=0.05). The run folder gets config.yaml, "
        "checkpoints/{last,best}.pt, metrics.jsonl, report.json, report.md and plots. "
        "Under torchrun (torchrun --nproc_per_node 2 -m asc train ...) it trains with DDP.")
    train.add_argument("--config", type=Path, default=None, help="YAML config file")
    train.add_argument("--out", type=Path, default=None, help="run folder (default: runs/train-DATE-TIME)")
    train.add_argument("--resume", type=Path, default=None, metavar="RUN",
                       help="continue a stopped run from its last checkpoint")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")

    evaluate = add_command(
        sub, "evaluate", _evaluate, help="evaluate a run or a bundle on a dataset split",
        description="Accuracy, macro accuracy and log loss of a trained run, per class (and per device and "
        "device group when the collection has devices), with plots, on the run's own evaluation split or on "
        "another collection: a TAU folder, a table or a class-per-folder tree read with data.* options "
        "(docs/datasets.md). Given an exported bundle (with --data), it evaluates through the torch-free "
        "runtime, as an app would.")
    evaluate.add_argument("run", type=Path, metavar="RUN_OR_BUNDLE",
                          help="run folder written by asc train/compress, or a bundle written by asc export")
    evaluate.add_argument("--data", type=Path, default=None,
                          help="TAU folder, table or class folders (default: the run's data)")
    evaluate.add_argument("--split", default=None,
                          help="split name, or all (default: the run's data.eval_split)")
    evaluate.add_argument("--checkpoint", choices=("last", "best"), default="last")
    evaluate.add_argument("--skip-missing", action="store_true",
                          help="evaluate the clips present when a dataset lists audio files it lacks")
    evaluate.add_argument("--out", type=Path, default=None, help="report folder (default: inside RUN)")
    evaluate.add_argument("overrides", nargs="*", metavar="key=value",
                          help="data settings for --data, e.g. data.label_column=category data.eval_folds=[5]")
