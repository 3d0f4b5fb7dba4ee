"""Label WAV files with an exported bundle, without torch: the smallest complete use of asc.runtime.

    python export/classify_wavs.py BUNDLE WAV [WAV ...] [--threads N] [--hop SECONDS]

Prints ``file<TAB>label<TAB>probability`` per file. It is the Python twin of what a phone app does
(see export/README.md), so it deliberately uses nothing but :mod:`asc.runtime`: if it runs in an
environment with only numpy, scipy, onnxruntime, soundfile and librosa, so does the bundle.
Exit status: 0 all files labelled, 1 some files could not be read, 2 the bundle is unusable.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from asc.errors import AscError
from asc.runtime import Classifier


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Label WAV files with an asc bundle (torch-free).")
    parser.add_argument("bundle", type=Path, help="bundle folder written by `asc export` (holds bundle.json)")
    parser.add_argument("wavs", type=Path, nargs="+", metavar="WAV", help="audio files to label")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    parser.add_argument("--hop", type=float, default=None,
                        help="seconds between window starts for long files (default: the clip length)")
    args = parser.parse_args(argv)
    try:
        classifier = Classifier(args.bundle, threads=args.threads, hop_seconds=args.hop)
    except AscError as error:
        print(error, file=sys.stderr)
        return 2
    failed = 0
    for wav in args.wavs:
        try:
            result = classifier.classify_file(wav, top_k=1)
        except AscError as error:  # one bad file must not hide the answers for the others
            print(error, file=sys.stderr)
            failed += 1
            continue
        print(f"{wav}\t{result.label}\t{result.probability:.3f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
