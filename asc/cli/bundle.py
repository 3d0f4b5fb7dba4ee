"""``asc bundle combine``: one bundle holding a general model and device-specific ones (DCASE 2025).

A file operation on exported bundles: it imports neither torch nor the training code, so it runs
where the bundles are deployed as well as where they were trained.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from asc.cli.common import EXIT_OK, Parser, Subparsers, add_command


def device_bundle(text: str) -> tuple[str, Path]:
    """``DEVICE=BUNDLE`` as (device, bundle folder)."""
    device, sep, path = text.partition("=")
    if not sep or not device or not path:
        raise argparse.ArgumentTypeError(f"'{text}' is not DEVICE=BUNDLE, e.g. a=export/a")
    return device, Path(path)


def _combine(args: argparse.Namespace) -> int:
    from asc.bundle_manifest import combine_bundles
    from asc.errors import AscError

    devices: dict[str, Path] = {}
    for device, path in args.device:
        if device in devices:
            raise AscError(f"--device {device}=...: given twice ({devices[device]} and {path}); give each device once")
        devices[device] = path
    manifest = combine_bundles(args.general, devices, args.out)
    print(f"{args.out}: general model from {args.general}, device models "
          + ", ".join(f"{device} ({model.precision}, {model.model_file})"
                      for device, model in manifest.device_models.items()))
    return EXIT_OK


ORDER = 45  #: place in `asc --help`


def register(sub: Subparsers) -> None:
    bundle = sub.add_parser("bundle", help="combine exported bundles (device-specific models)")
    bundle_sub = bundle.add_subparsers(dest="bundle_command", required=True, metavar="{combine}",
                                       parser_class=Parser)
    combine = add_command(
        bundle_sub, "combine", _combine, quiet=False,
        help="one bundle: a general model plus one model per known recording device",
        description="Copy the GENERAL bundle to OUT and add each device's bundle under OUT/devices/<device>/, "
        "listed in bundle.json's device_models with its own precision, ORT/xz files, parity.json and export "
        "metrics. Every device bundle must have the general bundle's labels, sample rate, clip length, front end "
        "and input shape. asc classify --device, asc evaluate and an app then answer with the recording device's "
        "model and fall back to the general one for unknown or missing devices. OUT appears whole or not at all.")
    combine.add_argument("general", type=Path, metavar="GENERAL", help="bundle of the general model (asc export)")
    combine.add_argument("--device", "--device-bundle", dest="device", type=device_bundle, action="append", required=True, metavar="DEVICE=BUNDLE",
                         help="a device's own bundle, e.g. a=export/a (repeat for each device)")
    combine.add_argument("--out", type=Path, required=True, help="bundle folder to write (replaced atomically)")
