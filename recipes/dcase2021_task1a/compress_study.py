#!/usr/bin/env python3
"""Compress one trained run five ways and tabulate accuracy against size.

    python recipes/dcase2021_task1a/compress_study.py RUN --out runs/c80 --sparsity 0.86 --ratio 0.6 \
        train.epochs=6 optim.lr=0.02 optim.warmup_epochs=0

Variants (each an ``asc compress`` run folder under ``--out``): prune-only, QAT-only, prune + QAT
without distillation, PQK, and structured pruning + QAT + distillation from RUN. The table lists
accuracy on all devices and on the unseen devices s4–s6, the drop against RUN, parameters after
BN folding, non-zero kB and all-parameter kB at the deployed width (int8: 1 byte). Finished
variants are reused and stopped ones resumed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import run as _recipe  # noqa: F401 -- first: importing run.py prefers sleeping OpenMP waits before torch loads

from asc.complexity import run_complexity
from asc.compress.stage import compress_run
from asc.errors import AscError
from asc.io import atomic_write_text
from asc.train.metrics import Metrics


def variants(sparsity: float, ratio: float) -> dict[str, tuple[list[str], list[str]]]:
    """``{folder: (methods, method options)}`` of the study."""
    return {
        "prune": (["prune"], [f"prune.sparsity={sparsity}"]),
        "qat": (["qat"], []),
        "prune_qat": (["prune", "qat"], [f"prune.sparsity={sparsity}"]),
        "pqk": (["pqk"], [f"pqk.sparsity={sparsity}"]),
        "structured_qat_kd": (["structured", "qat", "kd"], [f"structured.ratio={ratio}"]),
    }


def row(name: str, run: Path, reference: float | None) -> tuple[str, float]:
    metrics = Metrics.from_dict(json.loads((run / "report.json").read_text())["metrics"])
    size = run_complexity(run)
    unseen = metrics.per_group["unseen"].accuracy if "unseen" in metrics.per_group else float("nan")
    drop = "" if reference is None else f"{100 * (metrics.accuracy - reference):+.1f}"
    return (f"| {name} | {100 * metrics.accuracy:.1f} | {drop} | {100 * unseen:.1f} | {size.params:,} "
            f"| {size.nonzero_bytes / 1000:.1f} | {size.bytes / 1000:.1f} |"), metrics.accuracy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="trained (uncompressed) run folder")
    parser.add_argument("--out", type=Path, required=True, help="folder of the variants' run folders")
    parser.add_argument("--sparsity", type=float, default=0.8, help="unstructured sparsity of prune and pqk")
    parser.add_argument("--ratio", type=float, default=0.5, help="channel ratio removed by structured")
    parser.add_argument("--variants", type=lambda text: text.split(","), default=None, metavar="A,B,...",
                        help="run only these variants (default: all)")
    parser.add_argument("-q", "--quiet", action="store_true")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="run settings for every variant")
    args = parser.parse_intermixed_args(argv)  # key=value may follow the options
    try:
        lines = ["| model | all % | Δ pp | unseen % | parameters | non-zero kB | all kB |",
                 "|---|---:|---:|---:|---:|---:|---:|"]
        text, reference = row("uncompressed (fp32)", args.run, None)
        lines.append(text)
        for name, (methods, options) in variants(args.sparsity, args.ratio).items():
            if args.variants and name not in args.variants:
                continue
            print(f"=== {name}: {' + '.join(methods)}", flush=True)
            compress_run(args.run, args.out / name, methods, [*args.overrides, *options], progress=not args.quiet)
            lines.append(row(name, args.out / name, reference)[0])
        table = "\n".join(lines) + "\n"
        atomic_write_text(args.out / "summary.md", table)
        print(table)
    except AscError as error:
        print(f"compress_study.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
