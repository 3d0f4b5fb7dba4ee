"""The ``asc`` command line: parse arguments, call the library, print results.

Every user error surfaces as an :class:`~asc.errors.AscError` and is printed as one line on stderr
with exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from asc import __version__
from asc.errors import AscError

EXIT_USAGE = 2

Handler = Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors, like every other asc error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


# ---------------------------------------------------------------------------------------- data


def _data_synth(args: argparse.Namespace) -> int:
    from asc.config import parse_overrides
    from asc.data.synthetic import SynthConfig, synthesize

    overrides = parse_overrides(args.overrides)
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.ir_dir is not None:
        overrides["ir_dir"] = str(args.ir_dir)
    config = SynthConfig.preset(args.preset, **overrides)
    summary = synthesize(args.out, config, progress=not args.quiet)
    print(summary)
    return 0


def _data_check(args: argparse.Namespace) -> int:
    from asc.data.tau import check_tau, describe, read_tau

    problems = check_tau(args.root, decode=args.decode, progress=not args.quiet)
    errors = [p for p in problems if p.severity == "error"]
    for problem in problems:
        print(problem, file=sys.stderr)
    if errors:
        print(f"{args.root}: {len(errors)} error(s); the dataset cannot be used until they are fixed",
              file=sys.stderr)
        return EXIT_USAGE
    print(describe(read_tau(args.root)))
    print(f"{args.root}: OK" + (f" ({len(problems)} warning(s))" if problems else ""))
    return 0


def _add_data(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="create and validate datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="{synth,check}",
                                   parser_class=_Parser)

    synth = data_sub.add_parser(
        "synth", help="write a synthetic multi-device corpus in the TAU 2020 Mobile layout",
        description="Write a synthetic multi-device acoustic-scene corpus (TAU 2020 Mobile layout) "
        "into OUT. Re-running with the same settings reuses the existing corpus.")
    synth.add_argument("out", type=Path, help="output folder (created; must be empty or a previous corpus)")
    synth.add_argument("--preset", default="quick",
                       help="size preset: tiny (tests), quick (smoke runs) or standard (~2,000 training clips)")
    synth.add_argument("--seed", type=int, default=None, help="random seed (default: the preset's)")
    synth.add_argument("--ir-dir", type=Path, default=None,
                       help="folder of microphone impulse responses used for some devices")
    synth.add_argument("overrides", nargs="*", metavar="key=value",
                       help="any SynthConfig field, e.g. clip_seconds=4 train_segments_per_scene=200")
    _add_common(synth)
    synth.set_defaults(handler=_data_synth)

    check = data_sub.add_parser(
        "check", help="validate a TAU-layout dataset folder",
        description="Validate a TAU Urban Acoustic Scenes folder (meta.csv, evaluation_setup, audio) "
        "and print a per-split summary by device and class.")
    check.add_argument("root", type=Path, help="dataset folder (holds meta.csv and audio/)")
    check.add_argument("--decode", action="store_true", help="also decode every audio file")
    _add_common(check)
    check.set_defaults(handler=_data_check)


# ---------------------------------------------------------------------------------- train, evaluate


def _train(args: argparse.Namespace) -> int:
    from asc.config import RunConfig, load_config
    from asc.errors import ConfigError
    from asc.train.loop import Trainer

    if args.resume is not None:
        if args.config or args.overrides or args.out:
            raise ConfigError("--resume RUN continues a run with its own config.yaml; "
                              "drop --config, --out and key=value overrides")
        run_dir = args.resume
        config = load_config(RunConfig, run_dir / "config.yaml")
        if not (run_dir / "checkpoints" / "last.pt").is_file():
            raise ConfigError(f"{run_dir}: no checkpoints/last.pt to resume from; start it again with --out")
    else:
        config = load_config(RunConfig, args.config, args.overrides)
        run_dir = args.out or Path("runs") / time.strftime("train-%Y%m%d-%H%M%S")
        if (run_dir / "checkpoints" / "last.pt").exists():
            raise ConfigError(f"{run_dir}: already holds a run; continue it with --resume {run_dir} "
                              "or choose another --out")
    metrics = Trainer(config, run_dir, progress=not args.quiet).fit(resume=args.resume is not None)
    if metrics is not None:
        print(f"{run_dir}: accuracy {100 * metrics.accuracy:.1f} %, macro accuracy "
              f"{100 * metrics.macro_accuracy:.1f} %, log loss {metrics.log_loss:.3f} "
              f"(report: {run_dir / 'report.md'})")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from asc.bundle_manifest import MANIFEST_NAME
    from asc.errors import ConfigError
    from asc.report import write_report
    from asc.train.evaluate import evaluate_bundle, evaluate_run

    if (args.run / MANIFEST_NAME).is_file():
        if args.data is None:
            raise ConfigError(f"{args.run}: a bundle carries no dataset; give --data ROOT")
        metrics = evaluate_bundle(args.run, args.data, split=args.split or "evaluate", skip_missing=args.skip_missing,
                                  progress=not args.quiet)
        checkpoint = "bundle"
        default_out = args.run.with_name(f"{args.run.name}-eval-{args.split or 'evaluate'}")  # bundles stay as shipped
    else:
        metrics = evaluate_run(args.run, data_root=args.data, split=args.split, checkpoint=args.checkpoint,
                               skip_missing=args.skip_missing, progress=not args.quiet)
        checkpoint = args.checkpoint
        default_out = args.run / f"eval-{args.split or 'default'}-{checkpoint}"
    out = args.out or default_out
    write_report(out, metrics, extra={"run": str(args.run), "data": str(args.data or "run's own data"),
                                      "split": args.split or "default", "checkpoint": checkpoint},
                 title=f"Evaluation of {args.run.name}")
    print(f"{args.run}: {metrics.n} clips, accuracy {100 * metrics.accuracy:.1f} %, macro accuracy "
          f"{100 * metrics.macro_accuracy:.1f} %, log loss {metrics.log_loss:.3f}")
    for group, score in metrics.per_group.items():
        print(f"  {group:>7}: accuracy {100 * score.accuracy:.1f} % ({score.n} clips)")
    print(f"report: {out / 'report.md'}")
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser(
        "train", help="train a model and write a run folder",
        description="Train a model. Settings come from defaults, then --config FILE, then key=value "
        "overrides (e.g. model.args.width=80 optim.lr=0.05). The run folder gets config.yaml, "
        "checkpoints/{last,best}.pt, metrics.jsonl, report.json, report.md and plots. "
        "Under torchrun (torchrun --nproc_per_node 2 -m asc train ...) it trains with DDP.")
    train.add_argument("--config", type=Path, default=None, help="YAML config file")
    train.add_argument("--out", type=Path, default=None, help="run folder (default: runs/train-DATE-TIME)")
    train.add_argument("--resume", type=Path, default=None, metavar="RUN",
                       help="continue a stopped run from its last checkpoint")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    _add_common(train)
    train.set_defaults(handler=_train)

    evaluate = sub.add_parser(
        "evaluate", help="evaluate a run or a bundle on a dataset split",
        description="Accuracy, macro accuracy and log loss of a trained run, per device, device group "
        "and class, with plots, on the run's own evaluation split or on another TAU-layout dataset. "
        "Given an exported bundle (with --data), it evaluates through the torch-free runtime, as an app would.")
    evaluate.add_argument("run", type=Path, metavar="RUN_OR_BUNDLE",
                          help="run folder written by asc train/compress, or a bundle written by asc export")
    evaluate.add_argument("--data", type=Path, default=None, help="dataset root (default: the run's data)")
    evaluate.add_argument("--split", default=None, help="split name (default: the run's data.eval_split)")
    evaluate.add_argument("--checkpoint", choices=("last", "best"), default="last")
    evaluate.add_argument("--skip-missing", action="store_true",
                          help="evaluate the clips present when a dataset lists audio files it lacks")
    evaluate.add_argument("--out", type=Path, default=None, help="report folder (default: inside RUN)")
    _add_common(evaluate)
    evaluate.set_defaults(handler=_evaluate)


# ----------------------------------------------------------------------------------------- compress


def _compress(args: argparse.Namespace) -> int:
    import json

    from asc.compress.stage import compress_run

    out = args.out or args.run.with_name(f"{args.run.name}-{'+'.join(args.method)}")
    outcome = compress_run(args.run, out, args.method, args.overrides, progress=not args.quiet)
    report = json.loads((out / "report.json").read_text())
    size = report["complexity"]
    accuracy = report["metrics"]["accuracy"]
    print(f"{out}: {outcome}; finalized {report['precision']} model: accuracy {100 * accuracy:.1f} %, "
          f"{size['params']:,} parameters ({size['nonzero_params']:,} non-zero), "
          f"{size['nonzero_bytes'] / 1000:.1f} kB non-zero, {size['bytes'] / 1000:.1f} kB in all "
          f"(report: {out / 'report.md'})")
    return 0


def _add_compress(sub: argparse._SubParsersAction) -> None:
    from asc.compress.stage import METHODS

    parser = sub.add_parser(
        "compress", help="compress a trained run (pruning, int8 QAT, distillation, PQK)",
        description="Start from a trained run's weights, train with one or several compression methods "
        "and write a new run folder whose finalized.pt2 is the deployable model. key=value overrides set "
        "run settings (train.epochs=10 optim.lr=0.01) or method options (pqk.sparsity=0.8, "
        "structured.ratio=0.5, prune.sparsity=0.7, qat.freeze_bn_epochs=2, kd.teacher=RUN).")
    parser.add_argument("run", type=Path, help="trained run folder")
    parser.add_argument("--method", action="append", required=True, choices=tuple(METHODS),
                        help="compression method; repeat to compose (e.g. --method structured --method qat "
                        "--method kd)")
    parser.add_argument("--out", type=Path, default=None, help="new run folder (default: RUN-METHODS beside RUN)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="run settings and method options")
    _add_common(parser)
    parser.set_defaults(handler=_compress)


# ----------------------------------------------------------------------------------------- export, classify


def _export(args: argparse.Namespace) -> int:
    from asc.export import run_export_command

    run_export_command(args.run, args.out, int8=args.int8, frontend=args.frontend, force=args.force,
                       checkpoint=args.checkpoint, calibration_clips=args.calibration_clips,
                       parity_clips=args.parity_clips, progress=not args.quiet)
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "export", help="write a verified ONNX bundle (fp32 or int8) for a phone or the runtime",
        description="Convert a run's model (the finalized one for a compressed run) to ONNX, fp32 or int8 QDQ "
        "(a QAT-trained model keeps its trained scales; otherwise post-training calibration on training clips), "
        "check it against torch on held-out clips and write BUNDLE: model.onnx, model.ort, bundle.json, "
        "parity.json. An int8 model whose top-1 agreement with fp32 is below 99 % is refused unless --force.")
    parser.add_argument("run", type=Path, help="run folder (trained or compressed)")
    parser.add_argument("--out", type=Path, required=True, help="bundle folder to write (replaced atomically)")
    parser.add_argument("--int8", action="store_true", help="int8 QDQ instead of fp32")
    parser.add_argument("--frontend", choices=("in-graph", "external"), default="external",
                        help="external (default; the app or asc.runtime computes log-mel, 3-4x faster than onnxruntime's "
                        "STFT, docs/export-latency.md) or in-graph (the model takes raw PCM)")
    parser.add_argument("--force", action="store_true", help="write the bundle even if it fails the parity gate")
    parser.add_argument("--checkpoint", default="last", help="checkpoint of a trained run (last, best)")
    parser.add_argument("--calibration-clips", type=int, default=256, help="training clips for int8 calibration")
    parser.add_argument("--parity-clips", type=int, default=512, help="held-out clips for the parity check")
    _add_common(parser)
    parser.set_defaults(handler=_export)


def bundle_for(target: Path, *, progress: bool) -> Path:
    """A bundle folder as is; for a run folder its cached ``RUN/bundle``, exported on first use."""
    from asc.bundle_manifest import MANIFEST_NAME

    if (target / MANIFEST_NAME).is_file():
        return target
    if not (target / "config.yaml").is_file():
        raise AscError(f"{target}: neither a bundle (bundle.json) nor a run folder (config.yaml); "
                       "point at the output of `asc export` or `asc train`")
    bundle = target / "bundle"
    if not (bundle / MANIFEST_NAME).is_file():
        from asc.export import export_trained, is_quantized_graph, open_run
        from asc.export.verify import DEFAULT_MIN_AGREEMENT

        run = open_run(target)
        precision = "int8" if is_quantized_graph(run.model) else "fp32"
        print(f"exporting {target} to {bundle} ({precision}, once)", file=sys.stderr)
        # classifying needs a bundle either way: write it past the parity gate, but say so
        metrics = export_trained(run, bundle, precision=precision, force=True, progress=progress).metrics
        if not metrics["parity_gate_passed"]:
            print(f"asc: warning: {bundle}: top-1 agreement with {metrics['agreement_with']} is "
                  f"{metrics['top1_agreement']:.1%}, below the {DEFAULT_MIN_AGREEMENT:.0%} export gate; "
                  f"see {bundle / 'parity.json'}", file=sys.stderr)
    return bundle


def _classify(args: argparse.Namespace) -> int:
    from asc.classify import classify_paths, format_results
    from asc.runtime import Classifier

    classifier = Classifier(bundle_for(args.target, progress=not args.quiet), threads=args.threads,
                            hop_seconds=args.hop)
    results, failures = classify_paths(classifier, args.paths, windows=args.windows, top_k=args.top_k,
                                       progress=not args.quiet)
    sys.stdout.write(format_results(results, args.format, windows=args.windows))
    for failure in failures:
        print(f"asc: error: {failure}", file=sys.stderr)
    return 1 if failures else 0


def _add_classify(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "classify", help="label WAV files or folders with a bundle or a run",
        description="Classify audio files (any rate and channel count; folders are searched recursively) with "
        "an exported bundle, without torch. Long recordings are cut into clip-length windows whose "
        "log-probabilities are averaged. A file that cannot be read gets one error line and the others go on; "
        "the exit status is then 1. Given a run folder, its bundle is exported once into RUN/bundle (with a "
        "warning when it falls below the export parity gate).")
    parser.add_argument("target", type=Path, metavar="RUN_OR_BUNDLE", help="bundle folder or run folder")
    parser.add_argument("paths", type=Path, nargs="+", metavar="PATH", help="audio files or folders")
    parser.add_argument("--format", choices=("table", "json", "csv"), default="table")
    parser.add_argument("--windows", action="store_true", help="also print every window's result")
    parser.add_argument("--top-k", type=int, default=3, help="labels to list per file")
    parser.add_argument("--hop", type=float, default=None, help="seconds between windows (default: a clip)")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    _add_common(parser)
    parser.set_defaults(handler=_classify)


def _bench(args: argparse.Namespace) -> int:
    from asc.bench import bench_bundle, format_bench

    print(format_bench(bench_bundle(args.bundle, threads=tuple(args.threads), repeats=args.repeats)))
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "bench", help="latency of a bundle on this CPU",
        description="Per-clip latency (median, p90), real-time factor, the front end's share of the time and "
        "load time of model.onnx vs model.ort, for each thread count, measured round-robin in one run.")
    parser.add_argument("bundle", type=Path, help="bundle folder written by asc export")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="intra-op thread counts")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per configuration")
    parser.set_defaults(handler=_bench)


# ----------------------------------------------------------------------------------------- complexity


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated shape such as 1,1,256,431") from None


def _complexity(args: argparse.Namespace) -> int:
    from asc.complexity import run_complexity_command

    return run_complexity_command(args.target, args.rules, args.per_layer, checkpoint=args.checkpoint,
                                  weight_bytes=args.weight_bytes, input_shape=args.input_shape,
                                  one_second_shape=args.one_second_shape)


def _add_complexity(sub: argparse._SubParsersAction) -> None:
    from asc.complexity import rule_names

    parser = sub.add_parser(
        "complexity", help="parameters, non-zero bytes and MACs against the DCASE rules",
        description="Count parameters (after BatchNorm folding), non-zero parameters, bytes at the stored "
        "width and multiply-accumulates of a run folder or an ONNX model, and check them against the "
        "DCASE Task 1 complexity rules of 2021-2025.")
    parser.add_argument("target", type=Path, help="run folder, .onnx file, or a folder holding model.onnx")
    parser.add_argument("--rules", nargs="+", choices=rule_names(), default=list(rule_names()),
                        help="rule sets to check (default: all)")
    parser.add_argument("--per-layer", action="store_true", help="print the per-layer table")
    parser.add_argument("--checkpoint", choices=("last", "best"), default="last")
    parser.add_argument("--weight-bytes", type=int, choices=(1, 2, 4), default=None,
                        help="count every weight at this width (e.g. 1 for an int8 deployment)")
    parser.add_argument("--input-shape", type=_shape, default=None, help="model input for ONNX files")
    parser.add_argument("--one-second-shape", type=_shape, default=None,
                        help="model input for 1 s of audio (MAC rules of 2022 on)")
    parser.set_defaults(handler=_complexity)


# ----------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="asc", description="On-device acoustic scene classification toolkit.")
    parser.add_argument("--version", action="version", version=f"asc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    _add_data(sub)
    _add_train(sub)
    _add_compress(sub)
    _add_export(sub)
    _add_classify(sub)
    _add_bench(sub)
    _add_complexity(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may follow options (argparse only takes them before the first option)
    overrides = [item for item in extra if "=" in item and not item.startswith("-")]
    if extra != overrides or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    try:
        return args.handler(args)
    except AscError as error:
        print(f"asc: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("asc: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
