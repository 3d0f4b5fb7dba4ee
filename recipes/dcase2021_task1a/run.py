#!/usr/bin/env python3
"""DCASE 2021 Task 1A recipe: data → train → compress → export → evaluate.

    python recipes/dcase2021_task1a/run.py --quick                 # synthetic corpus, ~5 min on 2 CPU cores
    python recipes/dcase2021_task1a/run.py --data /path/to/TAU-urban-acoustic-scenes-2020-mobile-development
    python recipes/dcase2021_task1a/run.py --stage 2 --stop-stage 2 train.epochs=50

Stages are numbered, idempotent and skippable (``--stage N --stop-stage M``): the data stage reuses
an existing corpus, the train and compress stages resume a stopped run and skip a finished one,
and the export and evaluate stages rewrite their outputs. Settings come from conf.yaml
(+ quick.yaml with --quick) and ``key=value`` overrides of asc.config.RunConfig fields; the
compressed variants are listed in compress.yaml. The runner and the data, compress, export and
table steps are those of the later recipes (../common.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # recipes/ is not a package: recipes/common.py is imported by path

import common

from asc.config import RunConfig, read_yaml
from asc.errors import ConfigError
from asc.threads import prefer_sleeping_openmp_waits

prefer_sleeping_openmp_waits()  # on import: compare.py and compress_study.py load torch without common.run_stages

TITLE = "DCASE 2021 Task 1A"
RULES = "dcase2021"  #: the table's budget column: 128 kB of non-zero parameters


def run_settings(quick: bool, data: Path | None, out: Path, overrides: list[str]) -> RunConfig:
    """conf.yaml (+ quick.yaml) and ``key=value`` overrides, all of them RunConfig fields."""
    settings = common.read_settings([HERE], quick, overrides)
    if "recipe" in settings:  # run_config would drop them silently
        raise ConfigError("this recipe has no recipe.* settings; its compressed variants are in compress.yaml")
    return common.run_config(settings, data, out)


def stage_data(config: RunConfig, out: Path, options: common.Options) -> None:
    common.stage_data(config, options.progress)


def stage_train(config: RunConfig, out: Path, options: common.Options) -> None:
    from asc.train.loop import train_or_resume

    run = out / "train"
    if train_or_resume(config, run, progress=options.progress) == "finished":
        print(f"train: {run} is finished (delete it to train again)")


def compress_variants(quick: bool) -> dict[str, tuple[list[str], list[str]]]:
    """``{variant: (methods, overrides)}`` from compress.yaml; the quick profile trains them briefly."""
    settings = read_yaml(HERE / "compress.yaml")
    run = list(settings["run_overrides"]) + (list(settings["quick_run_overrides"]) if quick else [])
    return {name: (list(v["methods"]), run + list(v["overrides"])) for name, v in settings["variants"].items()}


def stage_compress(config: RunConfig, out: Path, options: common.Options) -> None:
    for name, (methods, overrides) in compress_variants(options.quick).items():
        common.compress(out / "train", out / "compress" / name, methods, overrides, f"compress {name}",
                        progress=options.progress)


def runs_of(out: Path) -> dict[str, Path]:
    """The trained run and every compressed variant that exists, by name."""
    runs = {"uncompressed": out / "train"}
    runs.update({path.name: path for path in sorted((out / "compress").glob("*")) if path.is_dir()})
    return runs


def stage_export(config: RunConfig, out: Path, options: common.Options) -> None:
    """One bundle per model: fp32 for the uncompressed run, int8 for the compressed (QAT) ones."""
    for name, run in runs_of(out).items():
        common.export_bundle(run, out / "export" / name, progress=options.progress)


def stage_evaluate(config: RunConfig, out: Path, options: common.Options) -> None:
    split = config.data.eval_split
    rows = common.evaluate_rows(runs_of(out), split, RULES, out / "evaluate", TITLE, progress=options.progress)
    common.write_summary(rows, RULES, out / "evaluate", f"{TITLE} on {split}")


STAGES: list[tuple[str, common.Stage]] = [
    ("data", stage_data),
    ("train", stage_train),
    ("compress", stage_compress),
    ("export", stage_export),
    ("evaluate", stage_evaluate),
]


def main(argv: list[str] | None = None) -> int:
    return common.run_stages(argv, description=__doc__, stages=STAGES, default_out="dcase2021_task1a",
                             prepare=lambda args, out: run_settings(args.quick, args.data, out, args.overrides))


if __name__ == "__main__":
    sys.exit(main())
