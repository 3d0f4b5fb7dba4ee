"""``asc data synth`` and ``asc data check``: create and validate datasets."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from asc.cli.common import EXIT_USAGE, Parser, Subparsers, add_command


def _synth(args: argparse.Namespace) -> int:
    from asc.config import parse_overrides
    from asc.data.synthetic import SynthConfig, synthesize

    overrides = parse_overrides(args.overrides)
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.ir_dir is not None:
        overrides["ir_dir"] = str(args.ir_dir)
    if args.format == "tau2022":  # TAU 2022 Mobile is the TAU layout with recordings cut into 1-s files
        overrides.setdefault("segment_seconds", 1.0)
    config = SynthConfig.preset(args.preset, **overrides)
    summary = synthesize(args.out, config, progress=not args.quiet,
                         layout="table" if args.format == "table" else "tau")
    print(summary)
    return 0


def _check(args: argparse.Namespace) -> int:
    from asc.config import DataConfig, override_data
    from asc.data.source import check_dataset, detect_format, read_dataset
    from asc.data.tau import describe

    config = override_data(DataConfig(), args.overrides, root=str(args.root))
    problems = check_dataset(args.root, config, decode=args.decode, progress=not args.quiet)
    for problem in problems:  # one line each, in the form of every other asc error
        print(f"asc: {problem}", file=sys.stderr)
    if any(problem.severity == "error" for problem in problems):
        return EXIT_USAGE
    clipset = read_dataset(args.root, config)
    print(describe(clipset))
    kind = detect_format(args.root, config.format)
    print(f"{args.root}: OK ({kind}, {sum(len(c) for c in clipset.splits.values())} clips, "
          f"{len(clipset.labels)} labels" + (f", {len(problems)} warning(s))" if problems else ")"))
    return 0


ORDER = 10  #: place in `asc --help`


def register(sub: Subparsers) -> None:
    data = sub.add_parser("data", help="create and validate datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="{synth,check}", parser_class=Parser)

    synth = add_command(
        data_sub, "synth", _synth, help="write a synthetic multi-device corpus in the TAU 2020 Mobile layout",
        description="Write a synthetic multi-device acoustic-scene corpus (TAU 2020 Mobile layout) "
        "into OUT. Re-running with the same settings reuses the existing corpus.")
    synth.add_argument("out", type=Path, help="output folder (created; must be empty or a previous corpus)")
    synth.add_argument("--preset", default="quick",
                       help="size preset: tiny (tests), quick (smoke runs) or standard (~2,000 training clips); "
                       "tau2022-tiny, tau2022-quick and tau2022 are the same cut into 1-s files (TAU 2022 layout)")
    synth.add_argument("--seed", type=int, default=None, help="random seed (default: the preset's)")
    synth.add_argument("--ir-dir", type=Path, default=None,
                       help="folder of microphone impulse responses used for some devices")
    synth.add_argument("--format", "--layout", dest="format", choices=("tau", "tau2022", "table"), default="tau",
                       help="tau: meta.csv + evaluation_setup/ (TAU 2020 Mobile); tau2022: the same with 1-s files "
                       "(…-<segment>-<index>-<device>.wav) and the DCASE 2024 split_setup/split{5,10,25,50,100}.csv; "
                       "table: one clips.csv (filename,scene_label,device,fold; fold 5 is the evaluation split)")
    synth.add_argument("overrides", nargs="*", metavar="key=value",
                       help="any SynthConfig field, e.g. clip_seconds=4 train_segments_per_scene=200")

    check = add_command(
        data_sub, "check", _check, help="validate a dataset: TAU folder, CSV/TSV table or class folders",
        description="Validate a collection read with the same data.* settings as asc train: a TAU folder "
        "(meta.csv, evaluation_setup, audio), a table (columns, folds, audio files) or a class-per-folder "
        "tree. Every problem is one line on stderr (exit 2 on errors); a clean collection gets a per-split "
        "summary by class (and device, when it has devices). See docs/datasets.md.")
    check.add_argument("root", type=Path, help="TAU folder, table file or class-per-folder tree")
    check.add_argument("--decode", action="store_true", help="also decode every audio file")
    check.add_argument("overrides", nargs="*", metavar="key=value",
                       help="data settings, e.g. data.label_column=category data.fold_column=fold")
