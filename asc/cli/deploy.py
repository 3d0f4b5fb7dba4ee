"""``asc export``, ``asc classify`` and ``asc bench``: from a run to a bundle, and using a bundle.

``classify`` and ``bench`` on a bundle import neither torch nor the training code (a test blocks
them): on a deployment machine they need numpy, soundfile and onnxruntime only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from asc.cli.common import (
    EXIT_OK,
    EXIT_SOME_FAILED,
    EXIT_USAGE,
    Subparsers,
    add_command,
    positive_int,
)
from asc.errors import AscError


def _export(args: argparse.Namespace) -> int:
    from asc.export import run_export_command

    if args.int8 and args.precision not in (None, "int8"):
        raise AscError(f"--int8 and --precision {args.precision} contradict each other; give one of them")
    run_export_command(args.run, args.out, int8=args.int8, precision=args.precision, frontend=args.frontend,
                       force=args.force, checkpoint=args.checkpoint, calibration_clips=args.calibration_clips,
                       parity_clips=args.parity_clips, progress=not args.quiet)
    return EXIT_OK


def bundle_for(target: Path, *, progress: bool) -> Path:
    """A bundle folder as is; for a run folder its cached ``RUN/bundle``, exported on first use and
    again once the run's model changed (trained further, compressed: :func:`asc.classify.stale_bundle`)."""
    from asc.bundle_manifest import MANIFEST_NAME
    from asc.classify import stale_bundle

    if (target / MANIFEST_NAME).is_file():
        return target
    if not (target / "config.yaml").is_file():
        raise AscError(f"{target}: neither a bundle (bundle.json) nor a run folder (config.yaml); "
                       "point at the output of `asc export` or `asc train`")
    bundle = target / "bundle"
    if bundle.exists() and not (bundle / MANIFEST_NAME).is_file() and (not bundle.is_dir() or any(bundle.iterdir())):
        raise AscError(f"{bundle}: is in the way of the bundle `asc classify` caches in a run folder; move it "
                       "elsewhere, or classify with a bundle from `asc export`")
    stale = stale_bundle(target, bundle) if (bundle / MANIFEST_NAME).is_file() else None
    if stale:
        print(f"asc: {stale}; exporting it again", file=sys.stderr)
    if stale or not (bundle / MANIFEST_NAME).is_file():
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
    from asc.classify import AUTO_DEVICE, classify_paths, format_results
    from asc.runtime import Classifier

    classifier = Classifier(bundle_for(args.target, progress=not args.quiet), threads=args.threads,
                            hop_seconds=args.hop)
    if args.device not in (None, AUTO_DEVICE, *classifier.devices):
        print(f"asc: warning: {classifier.bundle_dir}: no model for device {args.device!r} (device models: "
              f"{', '.join(classifier.devices) or 'none'}); using the general model", file=sys.stderr)
    results, failures = classify_paths(classifier, args.paths, windows=args.windows, top_k=args.top_k,
                                       progress=not args.quiet, device=args.device)
    sys.stdout.write(format_results(results, args.format, windows=args.windows, failures=failures,
                                    model=bool(classifier.devices)))
    for result in results:
        for warning in result.warnings:
            print(f"asc: warning: {result.source}: {warning}", file=sys.stderr)
    for failure in failures:
        print(f"asc: error: {failure}", file=sys.stderr)
    if failures:
        return EXIT_SOME_FAILED if results else EXIT_USAGE
    return EXIT_OK


def _bench(args: argparse.Namespace) -> int:
    from asc.bench import bench_bundle, format_bench

    print(format_bench(bench_bundle(args.bundle, threads=tuple(args.threads), repeats=args.repeats)))
    return EXIT_OK


ORDER = 40  #: place in `asc --help`


def register(sub: Subparsers) -> None:
    export = add_command(
        sub, "export", _export, help="write a verified ONNX bundle (fp32 or int8) for a phone or the runtime",
        description="Convert a run's model (the finalized one for a compressed run) to ONNX, fp32 or int8 QDQ "
        "(a QAT-trained model keeps its trained scales; otherwise post-training calibration on training clips), "
        "check it against torch on held-out clips and write BUNDLE: model.onnx, model.ort, bundle.json, "
        "parity.json. An int8 model whose top-1 agreement with fp32 is below 99 % is refused unless --force.")
    export.add_argument("run", type=Path, help="run folder (trained or compressed)")
    export.add_argument("--out", type=Path, required=True, help="bundle folder to write (replaced atomically)")
    export.add_argument("--int8", action="store_true", help="int8 QDQ instead of fp32 (= --precision int8)")
    export.add_argument("--precision", choices=("fp32", "int8", "auto"), default=None,
                        help="fp32, int8 (refused below the parity gate unless --force), or auto: int8 when it "
                        "passes the gate on held-out clips, else fp32 with the reason in bundle.json (runs the "
                        "int8 search first, docs/export-latency.md §14); default: what the model was trained "
                        "for, int8 for a QAT-compressed run (pqk, qat, ...), fp32 otherwise")
    export.add_argument("--frontend", choices=("in-graph", "external"), default="external",
                        help="external (default; the app or asc.runtime computes log-mel, 3-4x faster than "
                        "onnxruntime's STFT, docs/export-latency.md) or in-graph (the model takes raw PCM)")
    export.add_argument("--force", action="store_true", help="write the bundle even if it fails the parity gate")
    export.add_argument("--checkpoint", default="last", help="checkpoint of a trained run (last, best)")
    export.add_argument("--calibration-clips", type=int, default=256, help="training clips for int8 calibration")
    export.add_argument("--parity-clips", type=int, default=512, help="held-out clips for the parity check")

    classify = add_command(
        sub, "classify", _classify, help="label WAV files or folders with a bundle or a run",
        description="Classify audio files (any rate and channel count; folders are searched recursively) with "
        "an exported bundle, without torch. Long recordings are cut into clip-length windows whose "
        "log-probabilities are averaged. A file that cannot be read gets one error line (and an entry with "
        "its error in json/csv output) and the others go on. Clips shorter than half the model's window and "
        "silent recordings are classified with a warning. Given a run folder, its bundle is exported once "
        "into RUN/bundle (with a warning when it falls below the export parity gate).")
    classify.add_argument("target", type=Path, metavar="RUN_OR_BUNDLE", help="bundle folder or run folder")
    classify.add_argument("paths", type=Path, nargs="+", metavar="PATH", help="audio files or folders")
    classify.add_argument("--format", choices=("table", "json", "csv"), default="table")
    classify.add_argument("--windows", action="store_true", help="also print every window's result")
    classify.add_argument("--top-k", type=int, default=3, help="labels to list per file")
    classify.add_argument("--hop", type=float, default=None, help="seconds between windows (default: a clip)")
    classify.add_argument("--threads", type=int, default=None,
                          help="onnxruntime intra-op threads (default: the bundle's measured "
                          "runtime.intra_op_threads, else 1)")
    classify.add_argument("--device", default=None, metavar="NAME",
                          help="recording device of every file: a bundle with device models (asc bundle combine) "
                          "answers with that device's model, the general one for other devices; 'auto' reads "
                          "each file's device from its TAU-style name (...-a.wav); the output then has a model "
                          "column")

    bench = add_command(
        sub, "bench", _bench, help="latency of a bundle on this CPU", quiet=False,
        description="Per-clip latency (median, p90), real-time factor, the front end's share of the time and "
        "load time of model.onnx vs model.ort, for each thread count, measured round-robin in one run.")
    bench.add_argument("bundle", type=Path, help="bundle folder written by asc export")
    bench.add_argument("--threads", type=positive_int, nargs="+", default=[1, 2], help="intra-op thread counts")
    bench.add_argument("--repeats", type=positive_int, default=20, help="timed runs per configuration")
