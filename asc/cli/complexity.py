"""``asc complexity``: parameters, non-zero bytes and MACs against the DCASE rules."""

from __future__ import annotations

import argparse
from pathlib import Path

from asc.cli.common import Subparsers, add_command, shape

RULE_SET_NAMES = ("dcase2021", "dcase2022", "dcase2023", "dcase2024", "dcase2025")
"""Spelled out so that building the parser does not import torch; a test keeps it equal to
:data:`asc.complexity.RULE_SETS`."""


def _complexity(args: argparse.Namespace) -> int:
    from asc.complexity import run_complexity_command

    return run_complexity_command(args.target, args.rules, args.per_layer, checkpoint=args.checkpoint,
                                  weight_bytes=args.weight_bytes, input_shape=args.input_shape,
                                  one_second_shape=args.one_second_shape)


ORDER = 50  #: place in `asc --help`


def register(sub: Subparsers) -> None:
    parser = add_command(
        sub, "complexity", _complexity, help="parameters, non-zero bytes and MACs against the DCASE rules",
        quiet=False,
        description="Count parameters (after BatchNorm folding), non-zero parameters, bytes at the stored "
        "width and multiply-accumulates of a run folder, a bundle or an ONNX model, and check them against "
        "the DCASE Task 1 complexity rules of 2021-2025. A bundle's 1-s input comes from its bundle.json.")
    parser.add_argument("target", type=Path, help="run folder, bundle folder, or .onnx file")
    parser.add_argument("--rules", nargs="+", choices=RULE_SET_NAMES, default=list(RULE_SET_NAMES),
                        help="rule sets to check (default: all)")
    parser.add_argument("--per-layer", action="store_true", help="print the per-layer table")
    parser.add_argument("--checkpoint", choices=("last", "best"), default="last")
    parser.add_argument("--weight-bytes", type=int, choices=(1, 2, 4), default=None,
                        help="count every weight at this width (e.g. 1 for an int8 deployment)")
    parser.add_argument("--input-shape", type=shape, default=None,
                        help="model input of an ONNX file, e.g. 1x1x256x431 (default: from bundle.json or the graph)")
    parser.add_argument("--one-second-shape", type=shape, default=None,
                        help="model input for 1 s of audio, e.g. 1x1x256x44 (MAC rules of 2022 on; "
                        "default: from bundle.json)")
