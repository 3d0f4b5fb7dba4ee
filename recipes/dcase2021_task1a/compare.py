#!/usr/bin/env python3
"""Train several variants of the recipe with the same data, seed and epochs, and tabulate devices.

    python recipes/dcase2021_task1a/compare.py --study norms --out runs/norms [key=value ...]
    python recipes/dcase2021_task1a/compare.py --study augment --ir-dir /path/to/irs --out runs/augment

``norms`` compares the frequency-wise normalisation of BC-ResNet-Mod (BatchNorm, ResNorm, RFN);
``augment`` switches device augmentations on one at a time (translation, impulse responses,
Freq-MixStyle) and all together. The table shows accuracy on the training devices (a, b, c,
s1–s3), on the unseen devices (s4–s6), and the gap between them. Finished variants are reused and
stopped ones resumed, so a study can be extended or restarted at any time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# first: importing run.py prefers sleeping OpenMP waits before anything loads torch
from run import run_settings

from asc.errors import AscError, ConfigError
from asc.io import atomic_write_text
from asc.train.loop import train_or_resume
from asc.train.metrics import Metrics, Score

TRAIN_DEVICES = ("a", "b", "c", "s1", "s2", "s3")
UNSEEN_DEVICES = ("s4", "s5", "s6")


def studies(ir_dir: str | None) -> dict[str, dict[str, list[str]]]:
    no_augment = ["augment.translation=none", "augment.mixup_alpha=0", "augment.freq_masks=0", "augment.time_masks=0"]
    # DIR as published: impulse responses applied to device a's clips, the device the others mimic
    dir_on = ["augment.dir_p=0.6", f"augment.ir_dir={ir_dir}", "augment.source_device=a"] if ir_dir else None
    augment = {
        "none": no_augment,
        "translation": [*no_augment, "augment.translation=response"],
        "DIR": [*no_augment, *dir_on] if dir_on else None,
        "Freq-MixStyle": [*no_augment, "augment.mixstyle_p=0.4"],
        "all three": [*no_augment, "augment.translation=response", "augment.mixstyle_p=0.4", *(dir_on or [])],
    }
    return {
        "norms": {name: [*no_augment, f"model.args.freq_norm={norm}"]
                  for name, norm in (("BN", "bn"), ("ResNorm", "resnorm"), ("RFN", "rfn"))},
        "augment": {name: overrides for name, overrides in augment.items() if overrides is not None},
    }


def pooled(metrics: Metrics, devices: tuple[str, ...]) -> float:
    scores: list[Score] = [metrics.per_device[d] for d in devices if d in metrics.per_device]
    total = sum(s.n for s in scores)
    return sum(s.accuracy * s.n for s in scores) / total if total else float("nan")


def load_metrics(run: Path) -> Metrics:
    return Metrics.from_dict(json.loads((run / "report.json").read_text())["metrics"])


def table(rows: dict[str, Metrics], title: str) -> str:
    lines = [f"### {title}", "",
             "| variant | all % | train devices (a–c, s1–s3) % | unseen (s4–s6) % | gap (pp) | log loss |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, metrics in rows.items():
        seen, unseen = 100 * pooled(metrics, TRAIN_DEVICES), 100 * pooled(metrics, UNSEEN_DEVICES)
        lines.append(f"| {name} | {100 * metrics.accuracy:.1f} | {seen:.1f} | {unseen:.1f} | {seen - unseen:.1f} "
                     f"| {metrics.log_loss:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", choices=("norms", "augment"), required=True)
    parser.add_argument("--out", type=Path, required=True, help="folder of the variants' run folders")
    parser.add_argument("--quick", action="store_true", help="start from quick.yaml instead of conf.yaml alone")
    parser.add_argument("--data", type=Path, default=None, help="TAU folder (default: the synthetic corpus)")
    parser.add_argument("--ir-dir", default=None, help="impulse responses for the DIR variant (skipped without)")
    parser.add_argument("--variants", type=lambda text: text.split(","), default=None, metavar="A,B,...",
                        help="train only these comma-separated variants (default: all of the study)")
    parser.add_argument("-q", "--quiet", action="store_true")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every variant")
    args = parser.parse_args(argv)
    try:
        variants = studies(args.ir_dir)[args.study]
        unknown = sorted(set(args.variants or ()) - set(variants))
        if unknown:
            raise ConfigError(f"study '{args.study}' has no variant(s) {', '.join(unknown)}; "
                              f"choose from {', '.join(variants)}")
        rows = {}
        for name, overrides in variants.items():
            if args.variants and name not in args.variants:
                continue
            config = run_settings(args.quick, args.data, args.out, [*args.overrides, *overrides])
            run = args.out / name.replace(" ", "_")
            print(f"=== {args.study}: {name}", flush=True)
            train_or_resume(config, run, progress=not args.quiet)
            rows[name] = load_metrics(run)
        text = table(rows, f"Study '{args.study}': {' '.join(args.overrides) or 'recipe defaults'}")
        atomic_write_text(args.out / "summary.md", text)
        print(text)
    except AscError as error:
        print(f"compare.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
