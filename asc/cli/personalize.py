"""``asc personalize``: a PPP bundle pruned for one user or device from a few recordings.

On a gated bundle it imports neither torch nor the training code (a test blocks them), as a phone
would run it. Given the run folder of ``asc compress RUN --method ppp``, its gated bundle is
exported once into ``RUN/gated-bundle`` (that needs torch) and reused.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from asc.cli.common import EXIT_OK, EXIT_SOME_FAILED, Subparsers, add_command
from asc.errors import AscError

GATED_BUNDLE = "gated-bundle"


def gated_bundle_for(target: Path, *, progress: bool) -> Path:
    """A bundle folder as is; for a PPP run folder its cached ``RUN/gated-bundle``, exported on first use."""
    from asc.bundle_manifest import MANIFEST_NAME

    if (target / MANIFEST_NAME).is_file():
        return target
    if not (target / "config.yaml").is_file():
        raise AscError(f"{target}: neither a bundle (bundle.json) nor a run folder (config.yaml); point at the "
                       "output of `asc compress RUN --method ppp` or its gated bundle")
    bundle = target / GATED_BUNDLE
    if not (bundle / MANIFEST_NAME).is_file():
        from asc.export.gated import export_gated

        print(f"exporting the gated bundle of {target} to {bundle} (once)", file=sys.stderr)
        export_gated(target, bundle, force=True, progress=progress)
    return bundle


def _personalize(args: argparse.Namespace) -> int:
    from asc.personalize import UnusableEnrolment, personalize

    bundle = gated_bundle_for(args.target, progress=not args.quiet)
    try:
        result = personalize(bundle, args.enrol, args.out, progress=not args.quiet)
    except UnusableEnrolment as error:  # a batch command names every bad item, also when none was usable
        for failure in error.failures:
            print(f"asc: error: {failure}", file=sys.stderr)
        raise
    print(result.summary())
    for warning in result.warnings:
        print(f"asc: warning: {warning}", file=sys.stderr)
    for failure in result.failures:
        print(f"asc: error: {failure}", file=sys.stderr)
    return EXIT_SOME_FAILED if result.failures else EXIT_OK


ORDER = 42  #: place in `asc --help`: after export/classify/bench


def register(sub: Subparsers) -> None:
    parser = add_command(
        sub, "personalize", _personalize, help="prune a PPP bundle for one user or device (no training)",
        description="Run a few enrolment recordings of one user or device through a PPP-gated bundle (no gradient "
        "steps), average each channel gate over their windows into a prototype, keep the channels open in at "
        "least half of them, cut the closed channels out of the ONNX graph, delete the gates and write an "
        "ordinary, smaller bundle. Torch-free on a gated bundle. A run folder of `asc compress RUN --method ppp` "
        "is exported once into RUN/gated-bundle first. An unreadable enrolment file is reported and the others "
        "are used (exit status 1).")
    parser.add_argument("target", type=Path, metavar="RUN_OR_BUNDLE", help="gated bundle or PPP run folder")
    parser.add_argument("--enrol", type=Path, nargs="+", required=True, metavar="PATH",
                        help="enrolment audio files or folders (searched recursively)")
    parser.add_argument("--out", type=Path, required=True, help="bundle folder to write (replaced atomically)")
