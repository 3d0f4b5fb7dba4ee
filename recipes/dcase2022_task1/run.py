#!/usr/bin/env python3
"""DCASE 2022 (and 2023) Task 1 recipe: low-complexity ASC on 1-s clips of TAU Urban Acoustic Scenes
2022 Mobile, within 128K int8 parameters and 30 MMACs per 1-s input.

    python recipes/dcase2022_task1/run.py --quick                  # synthetic 1-s corpus, a CPU smoke run
    python recipes/dcase2022_task1/run.py --data /path/to/TAU-urban-acoustic-scenes-2022-mobile-development \\
        --ir-dir /path/to/micirp
    python recipes/dcase2022_task1/run.py --stage 4 --stop-stage 4 model.args.width=24

Stages (``--stage N --stop-stage M``, each idempotent): 1 data → 2 teachers (an ensemble of ordinary
runs) → 3 logits (the ensemble's logits, computed once) → 4 student (complexity gate, then ensemble
distillation with Freq-MixStyle and device impulse responses) → 5 qat (int8 quantization-aware
training) → 6 export (complexity gate, int8 bundle) → 7 evaluate. Settings: conf.yaml (+ quick.yaml
with --quick), then ``key=value`` overrides of asc.config.RunConfig fields or of ``recipe.*``.
DCASE 2023 used the same data and budget and only ranked differently (README.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # recipes/ is not a package: recipes/common.py is imported by path

import common

TITLE = "DCASE 2022 Task 1"


def stage_evaluate(plan: common.Plan, out: Path, options: common.Options) -> None:
    common.stage7_evaluate(plan, out, options, TITLE)


STAGES = [*common.TASK1_STAGES, ("evaluate", stage_evaluate)]


def main(argv: list[str] | None = None) -> int:
    return common.run_stages(argv, description=__doc__, stages=STAGES, default_out="dcase2022_task1",
                             prepare=lambda args, out: common.task1_plan([HERE], args, out),
                             extra_arguments=common.add_ir_dir)


if __name__ == "__main__":
    sys.exit(main())
