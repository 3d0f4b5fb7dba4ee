"""Cold-start wall time of the deployment commands against their targets, measured in one run.

    python benchmarks/startup.py [BUNDLE] [--repeats 7]

BUNDLE defaults to the main job's PQK bundle (runs/dcase2021_task1a_quick/export/pqk). Each
command runs in a fresh process, round-robin with the others so machine load hits all alike, and
the median is reported with ``import torch`` beside it: the deployment paths must not pay for it.
Targets (issue 9): ``asc --help`` <= 0.3 s, ``asc classify BUNDLE one.wav`` <= 1 s.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = REPO / "runs" / "dcase2021_task1a_quick" / "export" / "pqk"
TARGETS = {"asc --help": 0.3, "asc classify BUNDLE one.wav": 1.0}


def cpu_model() -> str:
    """The `lscpu` model name and the int8-relevant flags: startup and int8 figures depend on both."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    wanted = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return f"{name} ({' '.join(wanted) or 'no AVX2'})"


def cold_seconds(commands: dict[str, list[str]], repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in commands}
    for name, argv in commands.items():  # warm the page cache once: a user's second call is the norm
        subprocess.run(argv, capture_output=True, check=True)
    for _ in range(repeats):
        for name, argv in commands.items():
            start = time.perf_counter()
            subprocess.run(argv, capture_output=True, check=True)
            times[name].append(time.perf_counter() - start)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, nargs="?", default=DEFAULT_BUNDLE)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if not (args.bundle / "bundle.json").is_file():
        print(f"{args.bundle}: no bundle; run the README's main job first or pass a bundle folder", file=sys.stderr)
        return 2
    asc = shutil.which("asc") or sys.exit("asc is not on PATH; activate the venv that installed it")
    rate = int(__import__("json").loads((args.bundle / "bundle.json").read_text())["sample_rate"])
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "one.wav"
        sf.write(wav, 0.1 * np.random.default_rng(0).standard_normal(rate * 10).astype(np.float32), rate)
        commands = {
            "asc --help": [asc, "--help"],
            "asc classify BUNDLE one.wav": [asc, "classify", str(args.bundle), str(wav), "-q"],
            "asc bench BUNDLE (1 thread, 1 repeat)": [asc, "bench", str(args.bundle), "--threads", "1",
                                                       "--repeats", "1"],
            "python -c 'import asc.runtime'": [sys.executable, "-c", "import asc.runtime"],
            "python -c 'import torch' (for scale)": [sys.executable, "-c", "import torch"],
        }
        times = cold_seconds(commands, args.repeats)
    print(f"cold-process wall time, median of {args.repeats} round-robin runs; CPU: {cpu_model()}")
    print(f"bundle: {args.bundle}")
    width = max(map(len, times))
    for name, values in times.items():
        median = statistics.median(values)
        target = TARGETS.get(name)
        verdict = "" if target is None else f"  target <= {target:.1f} s: {'met' if median <= target else 'MISSED'}"
        print(f"  {name:<{width}}  {median:6.3f} s  (min {min(values):.3f}, max {max(values):.3f}){verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
