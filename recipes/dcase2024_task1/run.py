#!/usr/bin/env python3
"""DCASE 2024 Task 1 recipe: the DCASE 2022 pipeline once per data-efficiency split.

    python recipes/dcase2024_task1/run.py --quick                  # synthetic 1-s corpus, a CPU smoke run
    python recipes/dcase2024_task1/run.py --data /path/to/TAU-urban-acoustic-scenes-2022-mobile-development \\
        --ir-dir /path/to/micirp                                   # split{5,10,25,50,100}.csv in split_setup/
    python recipes/dcase2024_task1/run.py 'recipe.splits=[25]'     # one split only

Each split N (the official ``split{N}.csv`` subsets of the training split) gets its own teachers,
logits, distilled student, int8 QAT and bundle under ``OUT/splitN/``: teachers may only learn from
the split's clips. Stages (``--stage N --stop-stage M``) are those of the 2022 recipe, each run for
every split before the next; the evaluate stage ends with one markdown table of accuracy per split
and the macro-accuracy mean that 2024 ranked by. Settings: ../dcase2022_task1/conf.yaml, then this
folder's conf.yaml (what 2024 changes), then quick.yaml files with --quick, then ``key=value``.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # recipes/ is not a package: recipes/common.py is imported by path

import common

from asc.errors import ConfigError

FOLDERS = [HERE.parent / "dcase2022_task1", HERE]
TITLE = "DCASE 2024 Task 1"


def split_plans(plan: common.Plan, out: Path) -> list[tuple[int, common.Plan, Path]]:
    """``(percent, plan training on split{percent}, its output folder)`` for every configured split."""
    if not plan.settings.splits:
        raise ConfigError("recipe.splits is empty; list the training subsets, e.g. recipe.splits=[5,25,100]")
    return [(percent, common.Plan(common.with_overrides(plan.config, [f"data.train_split=split{percent}"]),
                                  plan.settings), out / f"split{percent}")
            for percent in plan.settings.splits]


def per_split(stage: common.Stage) -> common.Stage:
    def run(plan: common.Plan, out: Path, options: common.Options) -> None:
        for percent, split_plan, split_out in split_plans(plan, out):
            print(f"--- split{percent}", flush=True)
            stage(split_plan, split_out, options)

    run.__doc__ = stage.__doc__
    return run


def stage_evaluate(plan: common.Plan, out: Path, options: common.Options) -> None:
    """Every split's evaluation (OUT/splitN/evaluate/), then OUT/summary.md: one row per split."""
    from asc.train.data import open_clipset

    clipset = open_clipset(plan.config.data, progress=options.progress)
    header = "| split | training clips | teachers' ensemble % | student int8 accuracy % | macro accuracy % |"
    lines = [header + " unseen devices % |", "|---|---:|---:|---:|---:|---:|"]
    macro = []
    for percent, split_plan, split_out in split_plans(plan, out):
        print(f"--- split{percent}", flush=True)
        rows = {row.name: row for row in common.stage7_evaluate(split_plan, split_out, options, f"{TITLE} split{percent}")}
        student, ensemble = rows["student-int8"], rows.get("ensemble")
        macro.append(student.macro_accuracy)
        unseen = "" if student.unseen is None else f"{100 * student.unseen:.1f}"
        lines.append(f"| {percent} % | {len(clipset.split(f'split{percent}')):,} | "
                     f"{'' if ensemble is None else f'{100 * ensemble.accuracy:.1f}'} | {100 * student.accuracy:.1f} | "
                     f"{100 * student.macro_accuracy:.1f} | {unseen} |")
    lines.append(f"| mean | | | | {100 * sum(macro) / len(macro):.1f} | |")
    table = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(f"# {TITLE} on {plan.config.data.eval_split}: int8 student per training split\n\n"
                                    f"{table}")
    print(table, end="")
    print(f"summary: {out / 'summary.md'}")


STAGES = [("data", common.stage1_data), *((name, per_split(stage)) for name, stage in common.TASK1_STAGES[1:]),
          ("evaluate", stage_evaluate)]


def main(argv: list[str] | None = None) -> int:
    return common.run_stages(argv, description=__doc__, stages=STAGES, default_out="dcase2024_task1",
                             prepare=lambda args, out: common.task1_plan(FOLDERS, args, out),
                             extra_arguments=common.add_ir_dir)


if __name__ == "__main__":
    sys.exit(main())
