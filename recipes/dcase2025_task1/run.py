#!/usr/bin/env python3
"""DCASE 2025 Task 1 recipe: a general model plus device-specific fine-tuned copies, trained on the
25 % subset of TAU Urban Acoustic Scenes 2022 Mobile.

    python recipes/dcase2025_task1/run.py --quick                  # synthetic 1-s corpus, a CPU smoke run
    python recipes/dcase2025_task1/run.py --data /path/to/TAU-urban-acoustic-scenes-2022-mobile-development \\
        --ir-dir /path/to/micirp                                   # split25.csv in split_setup/

Stages (``--stage N --stop-stage M``, each idempotent): 1 data → 2 teachers → 3 logits → 4 student →
5 qat (the 2022 pipeline on split25: the general int8 model) → 6 devices (one fine-tuned int8 copy of
the general student per device of the training subset: int8 QAT + distillation from the general model
on that device's clips) → 7 export (complexity gate on every model, since the budget holds per model;
one int8 bundle each, then all of them combined into ``export/device-specific``, the one bundle a
2025 system ships: the runtime routes each clip to its device's model) → 8 evaluate (each clip by its
device's model, unknown devices by the general model; also through the combined bundle, as an app
computes it). Settings: ../dcase2022_task1/conf.yaml, this folder's conf.yaml, quick.yaml files with
--quick, then ``key=value``.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # recipes/ is not a package: recipes/common.py is imported by path

import common

FOLDERS = [HERE.parent / "dcase2022_task1", HERE]
TITLE = "DCASE 2025 Task 1"
TABLE_COLUMNS = ("filename", "scene_label", "device", "split")


def training_devices(plan: common.Plan) -> list[str]:
    """The devices that get their own model, in DCASE order: ``recipe.devices``, else every device of
    the training subset (a device without training clips has nothing to specialise on)."""
    from asc.data.clips import device_vocabulary
    from asc.errors import ConfigError
    from asc.train.data import open_clipset, split_clips

    clipset = open_clipset(plan.config.data, progress=False)
    trained = device_vocabulary(clip.device for clip in split_clips(clipset, plan.config.data.train_split))
    chosen = plan.settings.devices or trained
    unknown = sorted(set(chosen) - set(trained))
    if unknown:
        raise ConfigError(f"recipe.devices: {unknown} have no clips in {plan.config.data.train_split}; "
                          f"choose among {', '.join(trained)}")
    return [device for device in trained if device in chosen]


def device_table(plan: common.Plan, device: str, path: Path) -> list[str]:
    """A table of ``device``'s training and evaluation clips, and the data.* settings that read it.

    A plain table (docs/datasets.md) keeps the dataset as it is: the fine-tuning run reads the same
    audio, through the same caches, restricted to one device.
    """
    from asc.io import atomic_write_text
    from asc.train.data import dataset_root, open_clipset, split_clips

    data = plan.config.data
    root = dataset_root(data).absolute()
    clipset = open_clipset(data, progress=False)
    lines = ["\t".join(TABLE_COLUMNS)]
    for split, name in (("train", data.train_split), ("evaluate", data.eval_split)):
        for clip in split_clips(clipset, name):
            if clip.device == device:
                lines.append("\t".join([clip.path.relative_to(root).as_posix(), clip.label or "", device, split]))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(lines) + "\n")
    return [f"data.root={path}", "data.format=table", f"data.audio_dir={root}", "data.path_column=filename",
            "data.label_column=scene_label", "data.device_column=device", "data.split_column=split",
            "data.train_split=train", "data.eval_split=evaluate", "data.separator=\t"]


def stage_devices(plan: common.Plan, out: Path, options: common.Options) -> None:
    """One copy of the distilled general student per training device, fine-tuned on its clips."""
    settings = plan.settings
    for device in training_devices(plan):
        data = device_table(plan, device, out / "devices" / f"{device}.tsv")
        common.compress(out / "student", out / "devices" / device, settings.device_methods,
                        [*data, *settings.device_overrides], f"device {device}", progress=options.progress)


def model_runs(plan: common.Plan, out: Path) -> dict[str, Path]:
    """``{"general": …, device: …}``: every model the system deploys."""
    return {"general": out / "qat", **{device: out / "devices" / device for device in training_devices(plan)}}


COMBINED = "device-specific"
"""The combined bundle under ``export/``: the general model plus every device model."""


def stage_export(plan: common.Plan, out: Path, options: common.Options) -> None:
    """The budget holds for each model on its own: gate each, then one int8 bundle per model."""
    from asc.complexity import run_complexity

    runs = model_runs(plan, out)
    for name, run in runs.items():
        common.gate(run_complexity(run), plan.settings.rules, f"int8 model {name} ({run})",
                    "retrain a smaller student (e.g. model.args.width); nothing was exported")
    for name, run in runs.items():
        common.export_bundle(run, out / "export" / name, progress=options.progress)
    from asc.bundle_manifest import combine_bundles

    combined = out / "export" / COMBINED
    combine_bundles(out / "export" / "general", {d: out / "export" / d for d in runs if d != "general"}, combined)
    print(f"{combined}: one bundle, general model + {len(runs) - 1} device models "
          f"(asc classify {combined} PATH... --device auto)")


def stage_evaluate(plan: common.Plan, out: Path, options: common.Options) -> None:
    """Per device: the general model vs the one a 2025 system uses (its own, else the general)."""
    import numpy as np

    from asc.report import write_report
    from asc.train.evaluate import predict_run
    from asc.train.metrics import compute_metrics

    runs = model_runs(plan, out)
    general = predict_run(runs["general"], progress=options.progress)
    logits = {clip.path: row for clip, row in zip(general.clips, general.logits, strict=True)}
    for device, run in runs.items():
        if device != "general":
            own = predict_run(run, progress=options.progress)
            logits.update({clip.path: row for clip, row in zip(own.clips, own.logits, strict=True)})
    devices = [clip.device for clip in general.clips]
    chosen = np.stack([logits[clip.path] for clip in general.clips])
    both = {"general": general.metrics(), "device-specific": compute_metrics(chosen, general.targets, devices,
                                                                           general.labels)}
    combined = out / "export" / COMBINED
    if (combined / "bundle.json").is_file():  # what the shipped int8 bundle gives, routed by the runtime
        from dataclasses import replace

        from asc.bundle_eval import evaluate_bundle
        from asc.train.data import dataset_root

        data = replace(plan.config.data, root=str(dataset_root(plan.config.data)))
        both["device-specific bundle (int8 runtime)"] = evaluate_bundle(combined, data, split=data.eval_split,
                                                                        progress=options.progress)
    for name, metrics in both.items():
        write_report(out / "evaluate" / name, metrics, extra={"runs": {k: str(v) for k, v in runs.items()}},
                     title=f"{TITLE}: {name}")
    names = list(both["general"].per_device)
    lines = ["| model | " + " | ".join(names) + " | accuracy % | macro accuracy % |",
             "|---|" + "---:|" * (len(names) + 2)]
    for name, metrics in both.items():
        cells = [f"{100 * metrics.per_device[d].accuracy:.1f}" for d in names]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {100 * metrics.accuracy:.1f} | "
                     f"{100 * metrics.macro_accuracy:.1f} |")
    table = "\n".join(lines) + "\n"
    note = f"Device-specific models for {', '.join(d for d in runs if d != 'general')}; other devices use the general model.\n"
    (out / "evaluate" / "summary.md").write_text(f"# {TITLE} on {plan.config.data.eval_split}\n\n{note}\n{table}")
    print(note + table, end="")


STAGES = [*common.TASK1_STAGES[:5], ("devices", stage_devices), ("export", stage_export),
          ("evaluate", stage_evaluate)]


def main(argv: list[str] | None = None) -> int:
    return common.run_stages(argv, description=__doc__, stages=STAGES, default_out="dcase2025_task1",
                             prepare=lambda args, out: common.task1_plan(FOLDERS, args, out),
                             extra_arguments=common.add_ir_dir)


if __name__ == "__main__":
    sys.exit(main())
