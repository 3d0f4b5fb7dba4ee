"""Write a bundle for a phone app and say how well ORT Mobile can run it.

    python export/phone_bundle.py RUN --out BUNDLE [--int8] [--frontend in-graph|external]

The bundle is the one ``asc export`` writes (verified ONNX, parity, labels and front-end spec in
``bundle.json``), except that ``model.ort`` is converted for ARM: int8 QDQ may then run on ARM's
int8 kernels. ``required_operators.config`` beside it lists the operators a reduced-size
onnxruntime build must include (with the front end in the graph: STFT, MatMul and Log too).

Then onnxruntime's mobile usability checker (``python -m
onnxruntime.tools.check_onnx_model_mobile_usability``) reports how much of the graph NNAPI and
CoreML could take; for these models the CPU execution provider (with XNNPACK for float) is
usually the right choice, and this prints the lines that say so.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from asc.errors import AscError
from asc.export import FRONTENDS, export_run, format_summary

_SUMMARY_MARKERS = ("nodes can be handled by", "should perform well with")


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def mobile_usability(model_path: Path) -> tuple[bool, list[str]]:
    """Whether NNAPI/CoreML may help with ``model_path``, and the checker's full report."""
    from onnxruntime.tools.mobile_helpers import usability_checker

    logger = logging.getLogger("asc.phone_bundle.usability")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    records = _Records()
    logger.addHandler(records)
    try:
        try_eps = usability_checker.analyze_model(model_path, skip_optimize=False, logger=logger)
    finally:
        logger.removeHandler(records)
    return bool(try_eps), records.lines


def usability_summary(try_eps: bool, lines: Sequence[str]) -> str:
    """The checker's verdict lines (per execution provider) and what to do about them."""
    picked = [f"  {line.strip()}" for line in lines if any(marker in line for marker in _SUMMARY_MARKERS)]
    advice = ("NNAPI or CoreML may help: compare them with the CPU EP on the phone" if try_eps else
              "use the CPU execution provider (XNNPACK for float models); NNAPI/CoreML would split the graph")
    return "\n".join(["ORT Mobile usability:", *picked, f"  -> {advice}"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="run folder written by `asc train` or `asc compress`")
    parser.add_argument("--out", type=Path, required=True, help="bundle folder to write (replaced if a bundle)")
    parser.add_argument("--int8", action="store_true", help="int8 QDQ (post-training, or the run's QAT graph)")
    parser.add_argument("--frontend", choices=FRONTENDS, default="in-graph",
                        help="log-mel front end inside the graph (raw PCM input) or computed by the app")
    parser.add_argument("--checkpoint", default="last", help="checkpoint name in RUN/checkpoints (default: last)")
    parser.add_argument("--calibration-clips", type=int, default=256, help="training clips for int8 calibration")
    parser.add_argument("--force", action="store_true", help="write an int8 model that fails the parity gate")
    parser.add_argument("--verbose", action="store_true", help="print the usability checker's full report")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        manifest = export_run(args.run, args.out, checkpoint=args.checkpoint, precision="int8" if args.int8 else "fp32",
                              frontend=args.frontend, calibration_clips=args.calibration_clips, force=args.force,
                              ort_target="arm", progress=not args.quiet)
    except AscError as error:
        print(f"phone_bundle: error: {error}", file=sys.stderr)
        return 2
    print(format_summary(args.out, manifest))
    if manifest.ort_file is None:
        print("  no ORT-format file (see notes in parity.json); ship model.onnx with a full onnxruntime build")
    try_eps, lines = mobile_usability(args.out / manifest.model_file)
    print("\n".join(lines) if args.verbose else usability_summary(try_eps, lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
