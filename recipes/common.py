"""What the DCASE recipes share: settings files, the numbered-stage runner, the data stage, the
compress, export and results-table steps (the 2021 recipe uses these), and the Task 1 (2022+)
pipeline of ensemble teachers → precomputed logits → distilled student → int8 QAT → complexity
gate → int8 bundle → evaluation.

A recipe is a folder with ``run.py`` and YAML settings; ``run.py`` puts ``recipes/`` on
``sys.path`` and imports this file as ``common``, because ``recipes/`` is not an installed package.
Every stage is idempotent: a finished run or table is reused, a stopped run resumes, export and
evaluation rewrite their output.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from asc.config import (
    RunConfig,
    from_dict,
    load_config,
    merge,
    parse_overrides,
    read_yaml,
    to_dict,
)
from asc.errors import AscError, ConfigError
from asc.threads import prefer_sleeping_openmp_waits

if TYPE_CHECKING:
    import numpy as np

    from asc.complexity import Complexity

class Options(NamedTuple):
    """Command-line choices every stage may read (a NamedTuple: the scripts are loaded by path)."""

    progress: bool
    quick: bool


# ------------------------------------------------------------------------------------------ settings


@dataclass
class Task1Settings:
    """The ``recipe:`` section of a Task 1 recipe's YAML: what is not a setting of one run.

    Teachers are ordinary runs: the shared settings, then their own overrides, then
    ``teacher_overrides`` (applied to every teacher, e.g. a smaller width for a smoke run).
    """

    teachers: list[list[str]] = field(default_factory=lambda: [[]])
    teacher_overrides: list[str] = field(default_factory=list)
    kd_temperature: float = 2.0
    kd_weight: float = 1.0  #: loss = cross-entropy + kd_weight · T² · KL(ensemble ‖ student)
    qat_methods: list[str] = field(default_factory=lambda: ["qat"])  #: `asc compress --method` names
    qat_overrides: list[str] = field(default_factory=list)  #: their key=value settings (train.epochs=…)
    rules: str = "dcase2022"  #: the asc.complexity rule set the gate enforces
    splits: list[int] = field(default_factory=list)  #: DCASE 2024: one pipeline per training subset (percent)
    #: DCASE 2025: how each known device's copy of the general student is fine-tuned (asc compress)
    device_methods: list[str] = field(default_factory=lambda: ["qat", "kd"])
    device_overrides: list[str] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)  #: DCASE 2025: devices that get a model (default: all trained on)
    weight_bytes: int = 1  #: bytes per weight of the deployed student (int8)

    def __post_init__(self) -> None:
        if not self.teachers:
            raise ConfigError("recipe.teachers is empty; list at least one teacher (e.g. [[train.seed=1]])")


def read_settings(folders: Sequence[Path], quick: bool, overrides: Sequence[str]) -> dict[str, Any]:
    """Every folder's ``conf.yaml``, then (``quick``) every ``quick.yaml``, then ``key=value`` overrides.

    A later recipe lists an earlier one's folder first and keeps only what it changes; the quick
    files come after all full settings, so a smoke run stays a smoke run. Plain dicts, not validated.
    """
    settings: dict[str, Any] = {}
    names = ["conf.yaml", *(["quick.yaml"] if quick else [])]
    for name in names:
        for folder in folders:
            if name == "conf.yaml" or (folder / name).is_file():
                settings = merge(settings, read_yaml(folder / name))
    return merge(settings, parse_overrides(list(overrides)))


def run_config(settings: dict[str, Any], data: Path | None, out: Path) -> RunConfig:
    """The run settings (every section but ``recipe``); the synthetic corpus lives in ``out/data``."""
    run = {key: value for key, value in settings.items() if key != "recipe"}
    location = {"root": str(data) if data else None, "synth_dir": str(out / "data")}
    return load_config(RunConfig, base=merge(run, {"data": location}))


def task1_settings(settings: dict[str, Any]) -> Task1Settings:
    return from_dict(Task1Settings, settings.get("recipe") or {}, where="recipe.")


def with_overrides(config: RunConfig, overrides: Sequence[str]) -> RunConfig:
    """``config`` with ``key=value`` overrides applied and validated like any run config."""
    return load_config(RunConfig, base=merge(to_dict(config), parse_overrides(list(overrides))))


# ------------------------------------------------------------------------------------------ runner

Stage = Callable[..., None]


def run_stages(argv: Sequence[str] | None, *, description: str, stages: Sequence[tuple[str, Stage]],
               default_out: str, prepare: Callable[[argparse.Namespace, Path], Any],
               extra_arguments: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    """Parse ``--stage N --stop-stage M --quick --data --out -q key=value…`` and run the stages.

    ``prepare(args, out)`` builds what every stage receives first (the settings); any AscError,
    there or in a stage, ends the run with one line on stderr and exit status 2.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small corpus and models: a smoke run in minutes")
    parser.add_argument("--data", type=Path, default=None,
                        help="TAU Urban Acoustic Scenes development folder (default: the synthetic corpus)")
    parser.add_argument("--out", type=Path, default=None, help=f"output folder (default: runs/{default_out}[_quick])")
    parser.add_argument("--stage", type=int, default=1, help="first stage to run (" + ", ".join(
        f"{i} {name}" for i, (name, _) in enumerate(stages, start=1)) + ")")
    parser.add_argument("--stop-stage", type=int, default=len(stages), help="last stage to run")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    if extra_arguments is not None:
        extra_arguments(parser)
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="asc.config.RunConfig overrides, or recipe.* settings where the recipe has them")
    args = parser.parse_intermixed_args(None if argv is None else list(argv))  # overrides may follow options
    prefer_sleeping_openmp_waits()  # stages import torch lazily, so this is in time
    out = args.out or Path("runs") / (default_out + ("_quick" if args.quick else ""))
    options = Options(progress=not args.quiet, quick=args.quick)
    try:
        prepared = prepare(args, out)
        for number, (name, stage) in enumerate(stages, start=1):
            if args.stage <= number <= args.stop_stage:
                print(f"=== stage {number}: {name}", flush=True)
                started = time.monotonic()
                stage(prepared, out, options)
                print(f"--- stage {number} ({name}) took {time.monotonic() - started:.0f} s", flush=True)
    except AscError as error:
        print(f"run.py: error: {error}", file=sys.stderr)
        return 2
    return 0


# ------------------------------------------------------------------------------------------ stages


def stage_data(config: RunConfig, progress: bool) -> None:
    """Validate a real TAU folder (every problem on one line) or write the synthetic corpus; describe it."""
    from asc.data.tau import check_tau, describe
    from asc.train.data import dataset_root, open_clipset

    if config.data.root is not None:
        problems = check_tau(Path(config.data.root), progress=progress)
        for problem in problems:
            print(problem, file=sys.stderr)
        errors = [p for p in problems if p.severity == "error"]
        if errors:
            raise errors[0].to_error()
    clipset = open_clipset(config.data, progress=progress)
    print(f"dataset: {dataset_root(config.data)}")
    print(describe(clipset))


def train_teachers(config: RunConfig, settings: Task1Settings, folder: Path, progress: bool) -> list[Path]:
    """Train (or reuse) every teacher of the ensemble, each an ordinary run folder ``folder/tN``."""
    from asc.train.loop import train_or_resume

    runs = []
    for index, overrides in enumerate(settings.teachers):
        teacher = with_overrides(config, [*overrides, *settings.teacher_overrides])
        run = folder / f"t{index}"
        outcome = train_or_resume(teacher, run, progress=progress)
        print(f"teacher t{index} ({teacher.model.name} {teacher.model.args}, seed {teacher.train.seed}): "
              f"{outcome}: {run}")
        runs.append(run)
    return runs


def teacher_runs(settings: Task1Settings, folder: Path) -> list[Path]:
    runs = [folder / f"t{index}" for index in range(len(settings.teachers))]
    if missing := [run for run in runs if not (run / "report.json").is_file()]:
        raise AscError(f"{missing[0]}: teacher not trained; run the teachers stage first (--stage 2)")
    return runs


def ensemble_logits(config: RunConfig, runs: Sequence[Path], folder: Path, split: str, *,
                    progress: bool) -> np.ndarray:
    """The teachers' mean logits for every clip of ``split``, in the order the trainer reads it.

    Each teacher's table is cached under ``folder`` by a name that changes with its weights and the
    clips (asc.compress.kd.teacher_cache_name), so a rerun computes nothing; the mean is saved as
    ``folder/ensemble-<split>.npy`` for inspection.
    """
    import numpy as np

    from asc.compress.kd import precompute_teacher_logits, teacher_cache_name
    from asc.features import FeatureConfig
    from asc.io import atomic_path
    from asc.train.data import (
        clip_samples,
        clipset_devices,
        make_dataset,
        open_clipset,
        split_clips,
    )
    from asc.train.evaluate import load_run_model

    clipset = open_clipset(config.data, progress=progress)
    clips = split_clips(clipset, split)
    devices = clipset_devices(clipset)
    tables = []
    for run in runs:
        model, state = load_run_model(run)
        features = FeatureConfig.from_dict(state["features"])
        dataset = make_dataset(clips, clipset, devices, config=config.data, features=features,
                               num_samples=clip_samples(config.data, features, clips), as_features=True,
                               progress=progress)
        path = folder / "logits" / teacher_cache_name(model, dataset)
        path.parent.mkdir(parents=True, exist_ok=True)
        tables.append(precompute_teacher_logits(model, dataset, path, batch_size=config.train.eval_batch_size,
                                                progress=progress))
    mean = np.mean(tables, axis=0).astype(np.float32)
    with atomic_path(folder / f"ensemble-{split}.npy") as tmp, open(tmp, "wb") as handle:
        np.save(handle, mean)
    return mean


def budget_line(c: Complexity, rules: str, what: str) -> str:
    """``what``'s numbers against every limit of ``rules`` on one line (the failed ones, if any)."""
    from asc.complexity import check_rules

    results = check_rules(c, rules)
    failed = [r for r in results if r.passed is False]
    shown = ", ".join(str(r).split(": ", 1)[1] for r in (failed or results))  # drop the rule-name prefix
    return f"{what}: {shown} ({rules}; {c.params:,} parameters, {c.bytes:,} bytes)"


def gate(c: Complexity, rules: str, what: str, fix: str) -> None:
    """Refuse a model outside the budget with its numbers (one line); a model within it passes."""
    from asc.complexity import check_rules

    results = check_rules(c, rules)
    if any(r.passed is not True for r in results):
        raise AscError(f"{budget_line(c, rules, what)}; over the {rules} budget: {fix}")
    print(f"complexity gate passed: {budget_line(c, rules, what)}")


def planned_complexity(config: RunConfig, num_classes: int, weight_bytes: int, clip_samples: int) -> Complexity:
    """The student's size before any training: the model the config builds, counted as deployed."""
    from asc.complexity import complexity
    from asc.models import build_model

    model = build_model(config.model.name, num_classes, **config.model.args)
    features = config.features
    return complexity(model, (1, 1, features.n_mels, features.num_frames(clip_samples)), weight_bytes=weight_bytes,
                      one_second_shape=(1, 1, features.n_mels, features.num_frames(features.sample_rate)))


def train_student(config: RunConfig, settings: Task1Settings, run: Path, logits: np.ndarray, *,
                  progress: bool) -> str:
    """Train the student from scratch with ensemble distillation (train_or_resume: idempotent)."""
    from asc.compress.kd import Distillation, PrecomputedTeacher
    from asc.train.loop import train_or_resume

    hook = Distillation(PrecomputedTeacher(logits), temperature=settings.kd_temperature, weight=settings.kd_weight)
    return train_or_resume(config, run, hooks=[hook], progress=progress)


def compress(source: Path, run: Path, methods: Sequence[str], overrides: Sequence[str], what: str, *,
             progress: bool) -> None:
    """``asc compress`` of ``source`` into ``run`` (reused when finished, resumed when stopped), said in one line."""
    from asc.compress.stage import compress_run

    outcome = compress_run(source, run, methods, overrides, progress=progress)
    print(f"{what}: {' + '.join(methods)} {outcome}: {run}")


def export_bundle(run_dir: Path, out_dir: Path, *, progress: bool) -> None:
    """A bundle of a run at the precision it was trained for: int8 for a QAT graph, else fp32.

    A QAT graph passes the parity gate (its biases sit on the kernels' int32 grid,
    docs/export-latency.md §15); should one miss it on some CPU, it is still written, marked forced
    with the numbers in parity.json, so the recipe always ends with every deployable model.
    Post-training int8 of a float run is not tried, since it misses that gate on x86 (§14).
    """
    from asc.export import export_trained, format_summary, is_quantized_graph, open_run

    run = open_run(run_dir)
    int8 = is_quantized_graph(run.model)
    manifest = export_trained(run, out_dir, precision="int8" if int8 else "fp32", force=int8, progress=progress)
    print(format_summary(out_dir, manifest))


@dataclass
class Row:
    """One line of a results table."""

    name: str
    accuracy: float
    macro_accuracy: float
    unseen: float | None
    params: int | None = None
    kilobytes: float | None = None
    nonzero_kilobytes: float | None = None
    mmacs: float | None = None
    within: bool | None = None


def evaluate_rows(runs: dict[str, Path], split: str, rules: str, folder: Path, title: str, *,
                  progress: bool) -> list[Row]:
    """Evaluate every run on ``split``, write a report per run, return one row each."""
    from asc.complexity import check_rules, run_complexity
    from asc.report import write_report
    from asc.train.evaluate import evaluate_run

    rows = []
    for name, run in runs.items():
        metrics = evaluate_run(run, split=split, progress=progress)
        size = run_complexity(run)
        write_report(folder / name, metrics, extra={"run": str(run), "split": split}, title=f"{title}: {name}")
        unseen = metrics.per_group.get("unseen")
        within = all(r.passed for r in check_rules(size, rules))
        rows.append(Row(name, metrics.accuracy, metrics.macro_accuracy, unseen.accuracy if unseen else None,
                        size.params, size.bytes / 1000, size.nonzero_bytes / 1000, (size.macs_1s or 0) / 1e6,
                        within))
    return rows


def ensemble_row(name: str, logits: np.ndarray, config: RunConfig, *, progress: bool) -> Row:
    """Metrics of the teacher ensemble's mean logits on the eval split (no size: not deployed)."""
    from asc.train.data import open_clipset, split_clips
    from asc.train.metrics import compute_metrics

    clipset = open_clipset(config.data, progress=progress)
    clips = split_clips(clipset, config.data.eval_split)
    metrics = compute_metrics(logits, [clipset.label_index(c.label) for c in clips], [c.device for c in clips],
                              clipset.labels)
    unseen = metrics.per_group.get("unseen")
    return Row(name, metrics.accuracy, metrics.macro_accuracy, unseen.accuracy if unseen else None)


def markdown_table(rows: Sequence[Row], rules: str) -> str:
    """One line per row; a "non-zero kB" column where ``rules`` limit non-zero bytes (DCASE 2021:
    pruned zeros are free there, so that is the size that counts)."""
    from asc.complexity import RULE_SETS

    def pct(value: float | None) -> str:
        return "" if value is None else f"{100 * value:.1f}"

    nonzero = any(limit.quantity == "nonzero_bytes" for limit in RULE_SETS[rules].limits)
    sizes = ["parameters", *(["non-zero kB"] if nonzero else []), "kB", "MMACs / 1 s"]
    lines = ["| model | accuracy % | macro accuracy % | unseen devices % | " + " | ".join(sizes) + f" | {rules} |",
             "|---|---:|---:|---:|" + "---:|" * len(sizes) + "---|"]
    for r in rows:
        size = [""] * (len(sizes) + 1) if r.params is None else [
            f"{r.params:,}", *([f"{r.nonzero_kilobytes:.1f}"] if nonzero else []), f"{r.kilobytes:.1f}",
            f"{r.mmacs:.2f}", "within" if r.within else "OVER"]
        lines.append(f"| {r.name} | {pct(r.accuracy)} | {pct(r.macro_accuracy)} | {pct(r.unseen)} | "
                     + " | ".join(size) + " |")
    return "\n".join(lines) + "\n"


def write_summary(rows: Sequence[Row], rules: str, folder: Path, heading: str) -> None:
    """``folder/summary.md`` (the heading, then the table), and the table on stdout."""
    table = markdown_table(rows, rules)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.md").write_text(f"# {heading}\n\n{table}")
    print(table, end="")
    print(f"reports: {folder}")


def write_json(path: Path, data: Any) -> None:
    from asc.io import atomic_write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, data)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


# ------------------------------------------------------------------------- the Task 1 (2022+) pipeline


@dataclass
class Plan:
    """What every Task 1 stage receives: the shared run settings and the recipe's own."""

    config: RunConfig
    settings: Task1Settings


def task1_plan(folders: Sequence[Path], args: argparse.Namespace, out: Path) -> Plan:
    """Settings of the recipe (see :func:`read_settings`); without impulse responses DIR is switched
    off with a note."""
    settings = read_settings(folders, args.quick, args.overrides)
    config = run_config(settings, args.data, out)
    ir_dir = getattr(args, "ir_dir", None)
    if ir_dir is not None:
        config = with_overrides(config, [f"augment.ir_dir={Path(ir_dir).expanduser().absolute()}"])
    if config.augment.dir_p > 0 and config.augment.ir_dir is None:
        print("note: device impulse-response augmentation is off: no impulse responses "
              "(pass --ir-dir FOLDER, e.g. the MicIRP set, or augment.ir_dir=FOLDER)")
        config = with_overrides(config, ["augment.dir_p=0"])
    return Plan(config, task1_settings(settings))


def add_ir_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ir-dir", type=Path, default=None,
                        help="impulse responses for device impulse-response augmentation (DIR), e.g. MicIRP")


def stage1_data(plan: Plan, out: Path, options: Options) -> None:
    stage_data(plan.config, options.progress)


def stage2_teachers(plan: Plan, out: Path, options: Options) -> None:
    train_teachers(plan.config, plan.settings, out / "teachers", options.progress)


def stage3_logits(plan: Plan, out: Path, options: Options) -> None:
    """Ensemble logits of the training split (for the student) and of the eval split (for the table)."""
    config, runs = plan.config, teacher_runs(plan.settings, out / "teachers")
    train = ensemble_logits(config, runs, out / "teachers", config.data.train_split, progress=options.progress)
    evaluation = ensemble_logits(config, runs, out / "teachers", config.data.eval_split, progress=options.progress)
    row = ensemble_row("ensemble", evaluation, config, progress=options.progress)
    print(f"teacher logits: {len(runs)} teachers x {len(train)} training clips ({config.data.train_split}); "
          f"ensemble accuracy on {config.data.eval_split}: {100 * row.accuracy:.1f} %")


def stage4_student(plan: Plan, out: Path, options: Options) -> None:
    """The complexity gate on the planned student, then distillation from the ensemble."""
    from asc.train.data import clip_samples, open_clipset, split_clips

    config, settings = plan.config, plan.settings
    clipset = open_clipset(config.data, progress=options.progress)
    samples = clip_samples(config.data, config.features, split_clips(clipset, config.data.train_split))
    planned = planned_complexity(config, len(clipset.labels), settings.weight_bytes, samples)
    gate(planned, settings.rules, f"student {config.model.name} {config.model.args}",
         "make it smaller (e.g. model.args.width) before training")
    logits = ensemble_logits(config, teacher_runs(settings, out / "teachers"), out / "teachers",
                             config.data.train_split, progress=options.progress)
    outcome = train_student(config, settings, out / "student", logits, progress=options.progress)
    print(f"student: {outcome}: {out / 'student'}")


def stage5_qat(plan: Plan, out: Path, options: Options) -> None:
    compress(out / "student", out / "qat", plan.settings.qat_methods, plan.settings.qat_overrides, "qat",
             progress=options.progress)


def stage6_export(plan: Plan, out: Path, options: Options) -> None:
    """The complexity gate on the int8 student as it will ship, then its bundle."""
    from asc.complexity import run_complexity

    gate(run_complexity(out / "qat"), plan.settings.rules, f"int8 student {out / 'qat'}",
         "retrain a smaller student (e.g. model.args.width); nothing was exported")
    export_bundle(out / "qat", out / "export" / "student", progress=options.progress)


def stage7_evaluate(plan: Plan, out: Path, options: Options, title: str) -> list[Row]:
    """Teachers, their ensemble, the float and the int8 student on the eval split; summary.md."""
    import numpy as np

    settings, config, split = plan.settings, plan.config, plan.config.data.eval_split
    teachers = {run.name: run for run in teacher_runs(settings, out / "teachers")}
    rows = evaluate_rows(teachers, split, settings.rules, out / "evaluate", title, progress=options.progress)
    ensemble = out / "teachers" / f"ensemble-{split}.npy"
    if ensemble.is_file():
        rows.append(ensemble_row("ensemble", np.load(ensemble), config, progress=options.progress))
    rows += evaluate_rows({"student-fp32": out / "student", "student-int8": out / "qat"}, split, settings.rules,
                          out / "evaluate", title, progress=options.progress)
    write_summary(rows, settings.rules, out / "evaluate", f"{title} on {split}")
    return rows


TASK1_STAGES: list[tuple[str, Stage]] = [
    ("data", stage1_data),
    ("teachers", stage2_teachers),
    ("logits", stage3_logits),
    ("student", stage4_student),
    ("qat", stage5_qat),
    ("export", stage6_export),
]
