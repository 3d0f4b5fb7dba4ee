"""``asc compress``: the compression stage on a trained run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from asc.cli.common import Subparsers, add_command


def _compress(args: argparse.Namespace) -> int:
    from asc.compress.stage import compress_run
    from asc.train.distributed import launched_rank

    out = args.out or args.run.with_name(f"{args.run.name}-{'+'.join(args.method)}")
    outcome = compress_run(args.run, out, args.method, args.overrides, progress=not args.quiet)
    if launched_rank() != 0:  # under torchrun rank 0 finalizes and reports
        return 0
    report = json.loads((out / "report.json").read_text())
    size = report["complexity"]
    accuracy = report["metrics"]["accuracy"]
    print(f"{out}: {outcome}; finalized {report['precision']} model: accuracy {100 * accuracy:.1f} %, "
          f"{size['params']:,} parameters ({size['nonzero_params']:,} non-zero), "
          f"{size['nonzero_bytes'] / 1000:.1f} kB non-zero, {size['bytes'] / 1000:.1f} kB in all "
          f"(report: {out / 'report.md'})")
    return 0


ORDER = 30  #: place in `asc --help`


def register(sub: Subparsers) -> None:
    parser = add_command(
        sub, "compress", _compress, help="compress a trained run (pruning, int8 QAT, distillation, PQK, ...)",
        description="Start from a trained run's weights, train with one or several compression methods "
        "and write a new run folder whose finalized.pt2 is the deployable model. key=value overrides set "
        "run settings (train.epochs=10 optim.lr=0.01) or method options (pqk.sparsity=0.8, "
        "structured.ratio=0.5, prune.sparsity=0.7, qat.freeze_bn_epochs=2, kd.teacher=RUN). "
        "docs/compression.md lists the methods, their options and phases.")
    parser.add_argument("run", type=Path, help="trained run folder")
    parser.add_argument("--method", action="append", required=True, metavar="NAME",
                        help="compression method (structured, prune, qat, kd, pqk, psg, map, qkd, ...); repeat to compose "
                        "(--method structured --method qat --method kd); an unknown name lists the valid ones")
    parser.add_argument("--out", type=Path, default=None, help="new run folder (default: RUN-METHODS beside RUN)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="run settings and method options")
