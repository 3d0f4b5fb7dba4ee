#!/usr/bin/env python3
"""Every method of the compression stage, alone and in the sensible compositions, at matched budgets.

    python recipes/dcase2021_task1a/compress_study.py --base c40=runs/study/c40_base \
        --base c80=runs/study/c80_base --out runs/study --seeds 0 1 2 --jobs 12 \
        train.epochs=10 optim.lr=0.02 optim.warmup_epochs=0

Each (base, variant, seed) is one ``asc compress`` run folder ``OUT/<base>/<variant>/seed<N>``,
run as its own process (``--jobs`` at a time, one intra-op thread each), so a study fills the
cores of a big machine. Finished runs are reused and stopped ones resumed; a failed run is named
on stderr and the others go on. Seed 0 of every variant is then exported (int8 when the variant
quantizes) and its bundle timed on one thread, one bundle after another.

The table (``OUT/summary.md``) gives, per base, the mean ± standard deviation over the seeds of
the accuracy on all devices and on the unseen devices s4–s6, the non-zero and all-weight kB at
the deployed width (int8: 1 byte) and the bundle's model latency. Budgets: the pruning methods
keep about 60 k non-zero weights, the quantizing ones store int8; ``{teacher}`` in an option is
the ``--teacher`` base (a wider trained run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import run as _recipe  # noqa: F401 -- first: importing run.py prefers sleeping OpenMP waits before torch loads

from asc.errors import AscError, ConfigError
from asc.io import atomic_write_text

Budget = dict[str, object]  #: an option's value per base label, or one value for all bases


@dataclass(frozen=True)
class Variant:
    methods: tuple[str, ...]
    options: dict[str, object | Budget]
    note: str
    bases: tuple[str, ...] = ("c40", "c80")  #: the distillation-only variants are compared at the c = 40 student


SPARSITY: Budget = {"c40": 0.35, "c80": 0.86}  #: about 60 k non-zero weights (c = 80: 18.6 k never pruned)
RATIO: Budget = {"c40": 0.15, "c80": 0.6}  #: structured: about 60 k weights in all

VARIANTS: dict[str, Variant] = {
    "finetune": Variant(("kd",), {"kd.weight": 0}, "fine-tuned like the others, no distillation", bases=("c40",)),
    "kd": Variant(("kd",), {"kd.teacher": "{teacher}"}, "logit KD from the teacher", bases=("c40",)),
    "ffl": Variant(("ffl",), {}, "feature-fusion mutual learning, branch 0 ships", bases=("c40",)),
    "afd": Variant(("afd",), {"afd.disc_layers": 1}, "online adversarial distillation with a c = 80 peer, one-block discriminators",
                   bases=("c40",)),
    "ft": Variant(("ft",), {"ft.teacher": "{teacher}", "ft.paraphrase_epochs": 1},
                  "factor transfer from the teacher, one paraphraser epoch", bases=("c40",)),
    "prune": Variant(("prune",), {"prune.sparsity": SPARSITY}, "magnitude pruning, fp32"),
    "map": Variant(("map",), {"map.sparsity": SPARSITY}, "magnitude-attention pruning, fp32"),
    "dcil": Variant(("dcil",), {"dcil.sparsity": SPARSITY}, "dual-path collective pruning, fp32"),
    "qat": Variant(("qat",), {}, "int8 QAT"),
    "psg": Variant(("psg",), {"psg.bits": 8}, "position-based scaled gradient, 8-bit grid"),
    "qkd": Variant(("qkd",), {"qkd.bits": 8, "qkd.teacher": "{teacher}"}, "W8A8 QKD from the teacher"),
    "prune+qat": Variant(("prune", "qat"), {"prune.sparsity": SPARSITY}, "no distillation"),
    "pqk": Variant(("pqk",), {"pqk.sparsity": SPARSITY}, "prune + QAT + self-distillation"),
    "map+qat": Variant(("map", "qat"), {"map.sparsity": SPARSITY}, ""),
    "dcil+qat": Variant(("dcil", "qat"), {"dcil.sparsity": SPARSITY}, ""),
    "ppp": Variant(("ppp",), {"ppp.sparsity": 2}, "gated network as trained (personalization: personalize_study.py)",
                   ("c40",)),
    "structured": Variant(("structured",), {"structured.ratio": 0.25}, "channels removed, fp32", ("c40",)),
    "structured+qat+kd": Variant(("structured", "qat", "kd"), {"structured.ratio": RATIO, "kd.teacher": "{teacher}"},
                                 "channels removed, int8, KD"),
}
QUANTIZING = {"qat", "psg", "qkd", "pqk"}  #: variants with one of these export int8


def _value(value: object | Budget, base: str, teacher: Path) -> str:
    if isinstance(value, dict):
        if base not in value:
            raise ConfigError(f"no budget for base {base!r} (known: {', '.join(value)}); name bases c40 and c80")
        value = value[base]
    return str(value).replace("{teacher}", str(teacher))


def compress_command(variant: Variant, base: str, base_run: Path, teacher: Path, out: Path, seed: int,
                     device: str, overrides: list[str]) -> list[str]:
    options = [f"{key}={_value(value, base, teacher)}" for key, value in variant.options.items()]
    methods = [item for name in variant.methods for item in ("--method", name)]
    return [sys.executable, "-m", "asc", "compress", "--quiet", str(base_run), "--out", str(out), *methods,
            *overrides, *options, f"train.seed={seed}", f"train.device={device}"]


def run_job(command: list[str], out: Path) -> str | None:
    """Run one compression (skipped when finished); the error's last line, or None."""
    if (out / "finalized.pt2").is_file():
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(out.parent / f"{out.name}.log", "w") as log:
        result = subprocess.run(command, check=False, stdout=log, stderr=subprocess.STDOUT, env=env)
    if result.returncode == 0:
        return None
    lines = (out.parent / f"{out.name}.log").read_text().strip().splitlines()
    return lines[-1] if lines else f"exit status {result.returncode}"


def accuracies(run: Path) -> tuple[float, float]:
    metrics = json.loads((run / "report.json").read_text())["metrics"]
    unseen = metrics.get("per_group", {}).get("unseen", {}).get("accuracy", math.nan)
    return 100 * metrics["accuracy"], 100 * unseen


def export_bundle(run: Path, int8: bool) -> Path:
    """``RUN-bundle`` beside ``run`` (kept when it exists)."""
    bundle = run.with_name(run.name + "-bundle")
    if not (bundle / "bundle.json").is_file():
        command = [sys.executable, "-m", "asc", "export", "--quiet", str(run), "--out", str(bundle), "--force",
                   *(["--int8"] if int8 else [])]
        subprocess.run(command, check=True, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    return bundle


def model_latency_ms(bundle: Path) -> float:
    """The bundle's model alone on one thread (seeded noise input), median of 30 runs."""
    from asc.bench import bench_bundle

    result = bench_bundle(bundle, threads=(1,), repeats=30).results[0]
    return (result.model or result.end_to_end).median_ms


def mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return f"{statistics.fmean(values):.1f} ± {std:.1f}"


def noise_verdict(name: str, rows: dict[str, list[float]]) -> str:
    """Which variant leads on ``name`` and whether the runner-up is inside the seeds' noise."""
    ranked = sorted((statistics.fmean(v), key, v) for key, v in rows.items() if len(v) > 1)
    if len(ranked) < 2:
        return ""
    (m2, k2, v2), (m1, k1, v1) = ranked[-2], ranked[-1]
    spread = math.sqrt(statistics.variance(v1) / len(v1) + statistics.variance(v2) / len(v2))
    inside = m1 - m2 <= 2 * spread
    return (f"{name}: **{k1}** leads {k2} by {m1 - m2:.1f} points; "
            f"{'inside' if inside else 'outside'} the noise (2 standard errors = {2 * spread:.1f}).")


def table(base: str, out: Path, seeds: list[int], latencies: dict[str, float]) -> list[str]:
    from asc.complexity import run_complexity

    lines = [f"## Base {base}", "",
             "| variant | methods | all % | unseen % | non-zero weights | non-zero kB | all kB | bundle ms (1 thread) | seeds | note |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    budgets: dict[str, dict[str, list[float]]] = {}
    for name, variant in VARIANTS.items():
        runs = [out / base / name / f"seed{seed}" for seed in seeds]
        done = [run for run in runs if (run / "finalized.pt2").is_file()]
        if not done:
            continue
        scores = [accuracies(run) for run in done]
        size = run_complexity(done[0])
        latency = latencies.get(f"{base}/{name}")
        lines.append(f"| {name} | {' + '.join(variant.methods)} | {mean_std([s[0] for s in scores])} "
                     f"| {mean_std([s[1] for s in scores])} | {size.nonzero_params:,} | {size.nonzero_bytes / 1000:.1f} | {size.bytes / 1000:.1f} "
                     f"| {'—' if latency is None else f'{latency:.2f}'} | {len(done)} | {variant.note} |")
        quantized = bool(set(variant.methods) & QUANTIZING)
        budget = "pruned" if size.nonzero_params < 0.8 * size.params else ("int8" if quantized else "fp32, full size")
        budgets.setdefault(budget, {})[name] = [s[0] for s in scores]
    lines.append("")
    lines += [f"- {verdict}" for key, rows in sorted(budgets.items())
              if (verdict := noise_verdict(f"{key} budget", rows))]
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", action="append", required=True, metavar="LABEL=RUN",
                        help="a trained base run and its label (c40, c80: the budgets are per label)")
    parser.add_argument("--teacher", type=Path, default=None,
                        help="teacher run for kd/ft/qkd (default: the last --base)")
    parser.add_argument("--out", type=Path, required=True, help="folder of the study's run folders")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=1, help="compressions at a time (one thread each)")
    parser.add_argument("--device", default="cpu", help="train.device of every compression (cpu, cuda)")
    parser.add_argument("--variants", type=lambda text: text.split(","), default=None, metavar="A,B,...",
                        help=f"run only these (default: all of {', '.join(VARIANTS)})")
    parser.add_argument("--no-latency", action="store_true", help="skip exporting and timing the bundles")
    parser.add_argument("--tabulate", action="store_true", help="start no compression; tabulate what is finished")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="run settings for every compression")
    args = parser.parse_intermixed_args(argv)
    try:
        bases = dict(item.split("=", 1) for item in args.base)
        teacher = (args.teacher or Path(list(bases.values())[-1])).resolve()
        chosen = args.variants or list(VARIANTS)
        if unknown := sorted(set(chosen) - set(VARIANTS)):
            raise ConfigError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
        jobs = [(compress_command(VARIANTS[name], base, Path(run).resolve(), teacher,
                                  args.out / base / name / f"seed{seed}", seed, args.device, args.overrides),
                 args.out / base / name / f"seed{seed}")
                for seed in args.seeds for base, run in bases.items() for name in chosen if base in VARIANTS[name].bases]
        failed = 0
        if args.tabulate:
            jobs = []
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for (command, out), error in zip(jobs, pool.map(lambda job: run_job(*job), jobs)):
                if error is not None:
                    failed += 1
                    print(f"compress_study.py: {out}: {error}", file=sys.stderr)
        latencies: dict[str, float] = {}
        if not args.no_latency:  # exports side by side, then every bundle timed alone
            finished = [(f"{base}/{name}", args.out / base / name / f"seed{args.seeds[0]}") for base in bases
                        for name in chosen if (args.out / base / name / f"seed{args.seeds[0]}" / "finalized.pt2").is_file()]

            def export(item: tuple[str, Path]) -> Path | None:
                key, run = item
                try:
                    return export_bundle(run, bool(set(VARIANTS[key.split("/")[1]].methods) & QUANTIZING))
                except subprocess.CalledProcessError as error:
                    print(f"compress_study.py: export {run}: {error.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                    return None

            with ThreadPoolExecutor(max_workers=args.jobs) as pool:
                bundles = list(pool.map(export, finished))
            latencies = {key: model_latency_ms(bundle) for (key, _), bundle in zip(finished, bundles) if bundle}
        lines = ["# Compression study", "", f"Seeds {args.seeds}; settings: {' '.join(args.overrides)}", ""]
        for base in bases:
            lines += table(base, args.out, args.seeds, latencies)
        text = "\n".join(lines)
        atomic_write_text(args.out / "summary.md", text)
        print(text)
    except AscError as error:
        print(f"compress_study.py: error: {error}", file=sys.stderr)
        return 2
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
