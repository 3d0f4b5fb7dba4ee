#!/usr/bin/env python3
"""DCASE 2021 Task 1A recipe: data → train → evaluate.

    python recipes/dcase2021_task1a/run.py --quick                 # synthetic corpus, minutes on a CPU
    python recipes/dcase2021_task1a/run.py --data /path/to/TAU-urban-acoustic-scenes-2020-mobile-development
    python recipes/dcase2021_task1a/run.py --stage 2 --stop-stage 2 train.epochs=50

Stages are numbered, idempotent and skippable (``--stage N --stop-stage M``): the data stage reuses
an existing corpus, the train stage resumes a stopped run and skips a finished one, and the
evaluate stage rewrites its report. Settings come from conf.yaml (+ quick.yaml with --quick) and
``key=value`` overrides of asc.config.RunConfig fields.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from asc.config import RunConfig, load_config, merge, parse_overrides, read_yaml
from asc.errors import AscError

HERE = Path(__file__).resolve().parent


def load_recipe_config(quick: bool, data: Path | None, out: Path, overrides: list[str]) -> RunConfig:
    settings = read_yaml(HERE / "conf.yaml")
    if quick:
        settings = merge(settings, read_yaml(HERE / "quick.yaml"))
    settings = merge(settings, {"data": {"root": str(data) if data else None, "synth_dir": str(out / "data")}})
    return load_config(RunConfig, base=merge(settings, parse_overrides(overrides)))


def stage_data(config: RunConfig, out: Path, progress: bool) -> None:
    from asc.data.tau import check_tau, describe
    from asc.train.data import dataset_root, open_clipset

    if config.data.root is not None:
        problems = check_tau(Path(config.data.root), progress=progress)
        for problem in problems:
            print(problem, file=sys.stderr)
        errors = [p for p in problems if p.severity == "error"]
        if errors:
            raise errors[0].to_error()
    clipset = open_clipset(config.data, progress=progress)
    print(f"dataset: {dataset_root(config.data)}")
    print(describe(clipset))


def stage_train(config: RunConfig, out: Path, progress: bool) -> None:
    from asc.train.loop import train_or_resume

    run = out / "train"
    if train_or_resume(config, run, progress=progress) == "finished":
        print(f"train: {run} is finished (delete it to train again)")


def stage_evaluate(config: RunConfig, out: Path, progress: bool) -> None:
    from asc.report import write_report
    from asc.train.evaluate import evaluate_run

    metrics = evaluate_run(out / "train", progress=progress)
    write_report(out / "evaluate", metrics, extra={"run": str(out / "train"), "split": config.data.eval_split},
                 title="DCASE 2021 Task 1A: evaluation")
    print(f"evaluate: accuracy {100 * metrics.accuracy:.1f} %, macro accuracy {100 * metrics.macro_accuracy:.1f} %,"
          f" log loss {metrics.log_loss:.3f} on {metrics.n} clips")
    for group, score in metrics.per_group.items():
        print(f"  {group:>7} devices: accuracy {100 * score.accuracy:.1f} %  log loss {score.log_loss:.3f}")
    print(f"report: {out / 'evaluate' / 'report.md'}")


STAGES: list[tuple[str, Callable[[RunConfig, Path, bool], None]]] = [
    ("data", stage_data),
    ("train", stage_train),
    ("evaluate", stage_evaluate),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small corpus and model: a smoke run in minutes")
    parser.add_argument("--data", type=Path, default=None,
                        help="TAU Urban Acoustic Scenes 2020 Mobile development folder (default: synthetic corpus)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: runs/dcase2021_task1a[_quick])")
    parser.add_argument("--stage", type=int, default=1, help="first stage to run (1 data, 2 train, 3 evaluate)")
    parser.add_argument("--stop-stage", type=int, default=len(STAGES), help="last stage to run")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="asc.config.RunConfig overrides")
    args = parser.parse_args(argv)
    out = args.out or Path("runs") / ("dcase2021_task1a_quick" if args.quick else "dcase2021_task1a")
    try:
        config = load_recipe_config(args.quick, args.data, out, args.overrides)
        for number, (name, stage) in enumerate(STAGES, start=1):
            if args.stage <= number <= args.stop_stage:
                print(f"=== stage {number}: {name}", flush=True)
                stage(config, out, not args.quiet)
    except AscError as error:
        print(f"run.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
