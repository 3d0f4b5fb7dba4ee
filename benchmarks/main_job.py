#!/usr/bin/env python3
"""Wall time of the README's main job, stage by stage, against its 6-minute target.

The main job is ``recipes/dcase2021_task1a/run.py --quick`` followed by ``asc classify`` on the
unseen device s6. This script runs exactly that, as a user would after the install (warm Python
and pip, cold run folder), in one recipe process whose ``=== stage N`` lines are timestamped as
they stream, so per-stage times include nothing the user would not also wait for:

    python benchmarks/main_job.py                      # fresh run folder and an empty cache
    python benchmarks/main_job.py --warm-cache         # reuse the decode/feature cache ($ASC_CACHE)

The machine's load is printed before and after, and each stage's CPU time (all threads) beside
its wall time: on a shared machine wall times are only comparable between runs made under similar
load, CPU times much more so.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "dcase2021_task1a" / "run.py"
TARGET_S = 6 * 60.0
STAGE_LINE = re.compile(r"^=== stage (\d+): (\w+)")


def cpu_model() -> str:
    """``lscpu``'s Model name (the platform's processor string where lscpu is missing)."""
    try:
        listing = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    for line in listing.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


Timing = tuple[str, float, float]  # (stage, wall seconds, CPU seconds of the process, all threads)


def cpu_seconds(pid: int) -> float:
    """CPU time so far of a running process, its threads and its finished children (Linux; else NaN).

    The same sum as the exit status' rusage (``os.times().children_*``), so the stage CPU times
    add up to the recipe's total; the data stage's generator workers count once they exit.
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return sum(int(value) for value in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # u, s, cu, cs time


def run_recipe(out: Path, env: dict[str, str], extra: list[str], log: Path) -> list[Timing]:
    """Run the quick recipe once; one timing per stage, process start-up as "startup".

    CPU time is read when each stage starts; that of the last stage comes from the exit status.
    """
    command = [sys.executable, str(RECIPE), "--quick", "--quiet", "--out", str(out), *extra]
    before = os.times()
    marks: list[tuple[str, float, float]] = [("startup", time.perf_counter(), 0.0)]
    with log.open("w") as sink, subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                                 stderr=subprocess.STDOUT, text=True, bufsize=1) as process:
        assert process.stdout is not None
        for line in process.stdout:
            sink.write(line)
            sink.flush()
            if match := STAGE_LINE.match(line):
                marks.append((match[2], time.perf_counter(), cpu_seconds(process.pid)))
        code = process.wait()
    after = os.times()
    marks.append(("end", time.perf_counter(),
                  after.children_user + after.children_system - before.children_user - before.children_system))
    timings = [(name, marks[i + 1][1] - start, marks[i + 1][2] - cpu) for i, (name, start, cpu) in
               enumerate(marks[:-1])]
    if code != 0:
        print_table(timings)
        sys.exit(f"main_job: the recipe failed with status {code} in stage '{marks[-2][0]}'; its output is in {log}")
    return timings


def run_classify(out: Path, env: dict[str, str], log: Path) -> Timing:
    bundle = out / "export" / "pqk"
    clips = sorted((out / "data" / "audio").glob("*-s6.wav"))
    asc = Path(sys.executable).with_name("asc")
    command = [str(asc) if asc.exists() else "asc", "classify", str(bundle), *map(str, clips)]
    start, before = time.perf_counter(), os.times()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    seconds, after = time.perf_counter() - start, os.times()
    log.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        sys.exit(f"main_job: asc classify failed with status {result.returncode}; its output is in {log}")
    cpu = after.children_user + after.children_system - before.children_user - before.children_system
    return "classify", seconds, cpu


def print_table(timings: list[Timing]) -> float:
    """The stage table; returns the total wall time."""
    total = sum(seconds for _, seconds, _ in timings)
    print(f"load after: {load()}")
    print("| stage | wall s | share | CPU s |\n|---|---:|---:|---:|")
    for name, seconds, cpu in timings:
        print(f"| {name} | {seconds:.1f} | {100 * seconds / total:.0f} % | {cpu:.1f} |")
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "main_job_benchmark",
                        help="run folder, deleted first (default: runs/main_job_benchmark)")
    parser.add_argument("--warm-cache", action="store_true",
                        help="use the user's decode/feature cache instead of an empty one")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="passed on to run.py")
    args = parser.parse_args()

    if args.out.is_dir() and any(args.out.iterdir()) and not (args.out / "recipe.log").is_file():
        sys.exit(f"main_job: {args.out} is not empty and holds no earlier benchmark (recipe.log); "
                 "choose another --out, the folder is deleted first")
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    env = dict(os.environ)
    cache = None if args.warm_cache else tempfile.mkdtemp(prefix="asc-cache-")
    if cache:
        env["ASC_CACHE"] = cache
    print(f"cpu: {cpu_model()} ({os.cpu_count()} logical cores); load before: {load()}", flush=True)
    try:
        timings = run_recipe(args.out, env, args.overrides, args.out / "recipe.log")
        timings.append(run_classify(args.out, env, args.out / "classify.log"))
    finally:
        if cache:
            shutil.rmtree(cache, ignore_errors=True)
    total = print_table(timings)
    verdict = "within" if total <= TARGET_S else "OVER"
    print(f"| total | {total:.1f} | {total / 60:.2f} min, {verdict} the {TARGET_S / 60:.0f}-min target "
          f"({total / TARGET_S:.2f}x) | {sum(cpu for *_, cpu in timings):.1f} |")
    summary = args.out / "evaluate" / "summary.md"
    if summary.is_file():
        print(summary.read_text().split("\n", 2)[2], end="")
    return 0 if total <= TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
