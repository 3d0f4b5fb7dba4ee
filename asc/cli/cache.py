"""``asc cache`` and ``asc cache clear``: where the decode/feature cache is, how big, and emptying it."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from asc.cli.common import Subparsers, add_command


def _location(args: argparse.Namespace) -> tuple[Path, str]:
    """The cache folder and why it is there (the same default the training code uses)."""
    from asc.data.cache import CACHE_ENV, default_cache_dir

    if args.dir is not None:
        return Path(args.dir).expanduser(), "--dir"
    return default_cache_dir(), f"${CACHE_ENV}" if os.environ.get(CACHE_ENV) else "default; set $ASC_CACHE to move it"


def _cache(args: argparse.Namespace) -> int:
    from asc.data.cache import cache_usage, clear_cache, format_bytes

    root, why = _location(args)
    if args.action == "clear":
        removed = clear_cache(root)
        print(f"cleared {root}: freed {format_bytes(removed.total_bytes)} ({removed.total_bytes} bytes) "
              f"in {len(removed.entries)} entries, {removed.arrays} of them arrays")
        kept = [entry.path.name for entry in cache_usage(root).entries]
        if kept:
            print(f"kept {len(kept)} entries asc did not write: {', '.join(kept)}")
        return 0
    usage = cache_usage(root)
    print(f"cache: {root} ({why})")
    if not root.exists():
        print("total: 0 B (0 bytes) in 0 arrays (the folder does not exist yet)")
        return 0
    print(f"total: {format_bytes(usage.total_bytes)} ({usage.total_bytes} bytes) in {usage.arrays} arrays")
    for kind, (count, size) in usage.by_kind().items():
        print(f"  {kind:<10} {count:>5} entries {format_bytes(size):>10}")
    return 0


ORDER = 60  #: place in `asc --help`


def register(sub: Subparsers) -> None:
    parser = add_command(
        sub, "cache", _cache, quiet=False, help="show where the decode/feature cache is and its size; clear it",
        description="Show the decode/feature cache: its folder ($ASC_CACHE, else ~/.cache/asc; a run's "
        "data.cache_dir overrides both, pass it as --dir), total size, number of arrays and size per kind "
        "(waveforms, features, synthetic corpora, index, stale old-format arrays, partial writes). "
        "`asc cache clear` deletes everything asc wrote there and says how much was freed.")
    parser.add_argument("action", nargs="?", choices=("show", "clear"), default="show",
                        help="show (default) or clear")
    parser.add_argument("--dir", type=Path, default=None, metavar="DIR",
                        help="the cache folder (default: $ASC_CACHE, else ~/.cache/asc)")
