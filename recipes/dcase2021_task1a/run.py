#!/usr/bin/env python3
"""DCASE 2021 Task 1A recipe: data → train → compress → export → evaluate.

    python recipes/dcase2021_task1a/run.py --quick                 # synthetic corpus, ~5 min on 2 CPU cores
    python recipes/dcase2021_task1a/run.py --data /path/to/TAU-urban-acoustic-scenes-2020-mobile-development
    python recipes/dcase2021_task1a/run.py --stage 2 --stop-stage 2 train.epochs=50

Stages are numbered, idempotent and skippable (``--stage N --stop-stage M``): the data stage reuses
an existing corpus, the train and compress stages resume a stopped run and skip a finished one,
and the export and evaluate stages rewrite their outputs. Settings come from conf.yaml
(+ quick.yaml with --quick) and ``key=value`` overrides of asc.config.RunConfig fields; the
compressed variants are listed in compress.yaml.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from asc.config import RunConfig, load_config, merge, parse_overrides, read_yaml
from asc.errors import AscError
from asc.threads import prefer_sleeping_openmp_waits

HERE = Path(__file__).resolve().parent

prefer_sleeping_openmp_waits()  # before any stage imports torch; compare.py and compress_study.py import this first


def load_recipe_config(quick: bool, data: Path | None, out: Path, overrides: list[str]) -> RunConfig:
    settings = read_yaml(HERE / "conf.yaml")
    if quick:
        settings = merge(settings, read_yaml(HERE / "quick.yaml"))
    settings = merge(settings, {"data": {"root": str(data) if data else None, "synth_dir": str(out / "data")}})
    return load_config(RunConfig, base=merge(settings, parse_overrides(overrides)))


class Options(NamedTuple):
    """Command-line choices every stage may read (a NamedTuple: the script is also loaded by path)."""

    progress: bool
    quick: bool


def stage_data(config: RunConfig, out: Path, options: Options) -> None:
    from asc.data.tau import check_tau, describe
    from asc.train.data import dataset_root, open_clipset

    if config.data.root is not None:
        problems = check_tau(Path(config.data.root), progress=options.progress)
        for problem in problems:
            print(problem, file=sys.stderr)
        errors = [p for p in problems if p.severity == "error"]
        if errors:
            raise errors[0].to_error()
    clipset = open_clipset(config.data, progress=options.progress)
    print(f"dataset: {dataset_root(config.data)}")
    print(describe(clipset))


def stage_train(config: RunConfig, out: Path, options: Options) -> None:
    from asc.train.loop import train_or_resume

    run = out / "train"
    if train_or_resume(config, run, progress=options.progress) == "finished":
        print(f"train: {run} is finished (delete it to train again)")


def compress_variants(quick: bool) -> dict[str, tuple[list[str], list[str]]]:
    """``{variant: (methods, overrides)}`` from compress.yaml; the quick profile trains them briefly."""
    settings = read_yaml(HERE / "compress.yaml")
    run = list(settings["run_overrides"]) + (list(settings["quick_run_overrides"]) if quick else [])
    return {name: (list(v["methods"]), run + list(v["overrides"])) for name, v in settings["variants"].items()}


def stage_compress(config: RunConfig, out: Path, options: Options) -> None:
    from asc.compress.stage import compress_run

    for name, (methods, overrides) in compress_variants(options.quick).items():
        outcome = compress_run(out / "train", out / "compress" / name, methods, overrides,
                               progress=options.progress)
        print(f"compress: {name} ({' + '.join(methods)}) {outcome}: {out / 'compress' / name}")


def runs_of(out: Path) -> dict[str, Path]:
    """The trained run and every compressed variant that exists, by name."""
    runs = {"uncompressed": out / "train"}
    runs.update({path.name: path for path in sorted((out / "compress").glob("*")) if path.is_dir()})
    return runs


def stage_export(config: RunConfig, out: Path, options: Options) -> None:
    """One bundle per model: fp32 for the uncompressed run, int8 for the compressed ones.

    The int8 bundles are written even below the 99 % parity gate, so the recipe always ends with
    every deployable model; their bundle.json marks them forced and parity.json has the numbers.
    """
    from asc.export import export_trained, format_summary, is_quantized_graph, open_run

    for name, run_dir in runs_of(out).items():
        run = open_run(run_dir)
        int8 = is_quantized_graph(run.model)
        manifest = export_trained(run, out / "export" / name, precision="int8" if int8 else "fp32", force=int8,
                                  progress=options.progress)
        print(format_summary(out / "export" / name, manifest))


def stage_evaluate(config: RunConfig, out: Path, options: Options) -> None:
    from asc.complexity import run_complexity
    from asc.report import write_report
    from asc.train.evaluate import evaluate_run

    rows = ["| model | accuracy % | unseen devices % | parameters | non-zero kB | all kB |", "|---|---:|---:|---:|---:|---:|"]
    for name, run in runs_of(out).items():
        metrics = evaluate_run(run, progress=options.progress)
        size = run_complexity(run)
        write_report(out / "evaluate" / name, metrics, extra={"run": str(run), "split": config.data.eval_split},
                     title=f"DCASE 2021 Task 1A: {name}")
        unseen = metrics.per_group.get("unseen")
        rows.append(f"| {name} | {100 * metrics.accuracy:.1f} | {100 * unseen.accuracy if unseen else float('nan'):.1f} "
                    f"| {size.params:,} | {size.nonzero_bytes / 1000:.1f} | {size.bytes / 1000:.1f} |")
    table = "\n".join(rows) + "\n"
    (out / "evaluate" / "summary.md").write_text(f"# DCASE 2021 Task 1A on {config.data.eval_split}\n\n{table}")
    print(table, end="")
    print(f"reports: {out / 'evaluate'}")


STAGES: list[tuple[str, Callable[..., None]]] = [
    ("data", stage_data),
    ("train", stage_train),
    ("compress", stage_compress),
    ("export", stage_export),
    ("evaluate", stage_evaluate),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small corpus and model: a smoke run, ~5 min on 2 CPU cores")
    parser.add_argument("--data", type=Path, default=None,
                        help="TAU Urban Acoustic Scenes 2020 Mobile development folder (default: synthetic corpus)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: runs/dcase2021_task1a[_quick])")
    parser.add_argument("--stage", type=int, default=1,
                        help="first stage to run (" + ", ".join(f"{i} {name}" for i, (name, _) in
                                                              enumerate(STAGES, start=1)) + ")")
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
                stage(config, out, Options(progress=not args.quiet, quick=args.quick))
    except AscError as error:
        print(f"run.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
