#!/usr/bin/env python3
"""PPP personalization to each unseen device, against structured pruning without personalization.

    python recipes/dcase2021_task1a/personalize_study.py --ppp runs/study/c40/ppp/seed{0,1,2} \
        --structured runs/study/c40/structured-25/seed{0,1,2} --out runs/study/personalize

For every PPP run (one per seed) and every unseen device (s4, s5, s6): the first ``--enrol``
evaluation clips of that device (sorted by file name) personalize the run's gated bundle
(``asc personalize``, torch-free, no gradient step); the device's other evaluation clips score the
gated global bundle ("before") and the personalized one ("after"). Each structured run (channels
removed before fine-tuning, no personalization) is exported and scored on the same clips. Sizes
are model.onnx bytes and parameters; latency is the model alone on one thread, timed per bundle.
The table (``OUT/summary.md``) gives mean ± standard deviation over the runs.
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import run as _recipe  # noqa: F401 -- before asc: importing run.py prefers sleeping OpenMP waits before torch loads

from asc.bench import bench_bundle
from asc.config import RunConfig, load_config
from asc.data.clips import Clip
from asc.data.source import read_dataset
from asc.errors import AscError
from asc.io import atomic_write_text
from asc.runtime import Classifier

UNSEEN = ("s4", "s5", "s6")


@dataclass(frozen=True)
class Score:
    accuracy: float  #: percent on the held-out clips of the device
    kilobytes: float  #: model.onnx
    params: int  #: weights in the graph's initializers
    latency_ms: float  #: the model alone, one thread


def device_clips(run: Path, device: str, enrol: int) -> tuple[list[Clip], list[Clip]]:
    """(enrolment, held-out) evaluation clips of ``device``, split by sorted file name."""
    data = load_config(RunConfig, run / "config.yaml").data
    clips = sorted((clip for clip in read_dataset(Path(data.root), data).split("evaluate") if clip.device == device),
                   key=lambda clip: clip.path.name)
    if len(clips) <= enrol:
        raise AscError(f"{data.root}: device {device} has {len(clips)} evaluation clips; need more than --enrol {enrol}")
    return clips[:enrol], clips[enrol:]


def score(bundle: Path, clips: list[Clip]) -> Score:
    classifier = Classifier(bundle, threads=1)
    hits = [classifier.classify_file(clip.path).label == clip.label for clip in clips]
    graph = onnx.load(str(bundle / "model.onnx"))
    params = sum(int(np.prod(tensor.dims)) for tensor in graph.graph.initializer)
    result = bench_bundle(bundle, threads=(1,), repeats=30).results[0]
    return Score(100 * float(np.mean(hits)), (bundle / "model.onnx").stat().st_size / 1000, params,
                 (result.model or result.end_to_end).median_ms)


def export(run: Path, gated: bool) -> Path:
    bundle = run.with_name(run.name + ("-gated" if gated else "-bundle"))
    if not (bundle / "bundle.json").is_file():
        if gated:
            from asc.export.gated import export_gated

            export_gated(run, bundle, progress=False)
        else:
            subprocess.run([sys.executable, "-m", "asc", "export", "--quiet", str(run), "--out", str(bundle)],
                           check=True, capture_output=True, text=True)
    return bundle


def mean_std(values: list[float], digits: int = 1) -> str:
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return f"{statistics.fmean(values):.{digits}f} ± {std:.{digits}f}"


def row(name: str, device: str, scores: list[Score]) -> str:
    return (f"| {name} | {device} | {mean_std([s.accuracy for s in scores])} | "
            f"{mean_std([s.kilobytes for s in scores])} | {mean_std([s.params for s in scores], 0)} | "
            f"{mean_std([s.latency_ms for s in scores], 2)} | {len(scores)} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ppp", type=Path, nargs="+", required=True, help="PPP run folders (one per seed)")
    parser.add_argument("--structured", type=Path, nargs="*", default=[], help="structured runs to compare with")
    parser.add_argument("--out", type=Path, required=True, help="folder of the personalized bundles and summary.md")
    parser.add_argument("--enrol", type=int, default=10, help="enrolment clips per device")
    args = parser.parse_args(argv)
    for runs in (args.ppp, args.structured):  # a study stopped early leaves unfinished folders out
        runs[:] = [run for run in runs if (run / "finalized.pt2").is_file()]
    try:
        if not args.ppp:
            raise AscError("no finished PPP run (a finished run folder with finalized.pt2) among --ppp")
        from asc.personalize import personalize

        lines = [("| model | device | accuracy on the device's other clips % | model.onnx kB | parameters "
                 "| model ms (1 thread) | runs |"), "|---|---|---:|---:|---:|---:|---:|"]
        for device in UNSEEN:
            before, after, structured = [], [], []
            for seed, run in enumerate(args.ppp):
                enrol, held_out = device_clips(run, device, args.enrol)
                gated = export(run, gated=True)
                target = args.out / f"{run.parent.name}-{run.name}-{device}"
                if not (target / "bundle.json").is_file():
                    print(personalize(gated, [clip.path for clip in enrol], target).summary(), flush=True)
                before.append(score(gated, held_out))
                after.append(score(target, held_out))
            for run in args.structured:
                structured.append(score(export(run, gated=False), device_clips(run, device, args.enrol)[1]))
            lines += [row("PPP gated, global", device, before), row("PPP personalized", device, after)]
            if structured:
                lines.append(row(f"structured ({args.structured[0].parent.name}), no personalization", device,
                                 structured))
        text = "\n".join(lines) + "\n"
        atomic_write_text(args.out / "summary.md", text)
        print(text)
    except (AscError, subprocess.CalledProcessError) as error:
        print(f"personalize_study.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
