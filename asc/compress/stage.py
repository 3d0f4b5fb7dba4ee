"""The compression stage: run one or several methods on a trained run, write a new run folder.

``asc compress RUN --method pqk [key=value …]`` starts from RUN's weights, trains with the
methods' hooks in the one training loop, then keeps the two halves apart (reference/
compression.md §7): training-time simulation lives in ``checkpoints/last.pt``, and the
materialized results are written beside it:

* ``finalized.pt2`` — the deployable module (masks applied, channels removed, BN folded and int8
  weights for quantized methods) as an exported program; export and evaluation load it without
  knowing which method made it;
* ``checkpoints/float.pt`` — its float twin (same weights before int8 conversion) as an ordinary
  checkpoint, for size accounting and as the start of a further stage;
* ``compress.yaml`` — the source run and every method's settings; ``report.json`` — metrics of
  the finalized module and its complexity.

Keys of the overrides either configure the run (``train.epochs=10``, ``optim.lr=0.01``) or a
method (``pqk.sparsity=0.8``, ``structured.ratio=0.5``). A composition is checked before any
folder is written: no two methods may share a job (:class:`~asc.compress.base.Job`) or an output
key, and the methods run in job order whatever the argument order.
"""

from __future__ import annotations

import copy
import itertools
import shutil
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from asc.complexity import complexity
from asc.compress.base import Method, StageContext, method_classes
from asc.compress.prune import materialize_masks
from asc.config import (
    RunConfig,
    load_config,
    parse_overrides,
    read_yaml,
    save_yaml,
)
from asc.errors import AscError, ConfigError
from asc.features import FeatureConfig
from asc.io import make_dir
from asc.models.resize import channel_spec
from asc.run_files import (
    COMPRESS_PLAN_NAME,
    FINALIZED_NAME,
    FLOAT_CHECKPOINT,
    checkpoint_file,
    trainable_checkpoint,
)
from asc.train.checkpoint import (
    load_checkpoint,
    save_checkpoint,
    save_finalized,
)
from asc.train.evaluate import load_run_model
from asc.train.loop import Trainer


def split_overrides(overrides: Sequence[str], methods: Sequence[str]) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Run-config overrides and per-method options from one ``key=value`` list."""
    run_sections = {f.name for f in fields(RunConfig)}
    run: list[str] = []
    options: dict[str, dict[str, Any]] = {name: {} for name in methods}
    for item in overrides:
        head = item.partition("=")[0].partition(".")[0]
        if head in run_sections:
            run.append(item)
        elif head in options:
            options[head].update(parse_overrides([item.partition(".")[2]]))
        else:
            known = ", ".join(sorted(run_sections | set(methods)))
            raise ConfigError(f"override '{item}' names neither a run setting nor a chosen method; "
                              f"prefix it with one of: {known}")
    return run, options


def compose(names: Sequence[str]) -> list[type[Method]]:
    """The classes of ``names`` in pipeline order; a list they cannot all run in is a ConfigError."""
    registry = method_classes()
    if not names:
        raise ConfigError(f"choose at least one --method: {', '.join(registry)}")
    unknown = [name for name in names if name not in registry]
    if unknown:
        raise ConfigError(f"unknown compression method {unknown[0]!r}; valid: {', '.join(registry)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"--method lists a method twice ({', '.join(names)}); give each once")
    classes = [registry[name] for name in names]
    for first, second in itertools.combinations(classes, 2):
        shared = sorted(first.jobs & second.jobs)
        if shared:
            jobs = " and ".join(job.describe for job in shared)
            raise ConfigError(f"methods {first.name} and {second.name} both do {jobs}; drop one")
    return sorted(classes, key=lambda cls: cls.pipeline_position())


def build_methods(names: Sequence[str], options: dict[str, dict[str, Any]], context: StageContext) -> list[Method]:
    """The configured methods in pipeline order (structure, masks, quantization, distillation)."""
    built = [cls.build(options.get(cls.name, {}), context) for cls in compose(names)]
    for first, second in itertools.combinations(built, 2):
        shared = sorted(first.output_keys() & second.output_keys())
        if shared:
            raise ConfigError(f"methods {first.name} and {second.name} both produce {', '.join(shared)}; drop one")
    tapping = [method for method in built if method.feature_taps()]
    opaque = [method for method in built if not method.keeps_stages]
    if tapping and opaque:
        first, second = tapping[0].name, opaque[0].name
        raise ConfigError(f"method {first} reads the student's feature maps, which {second}'s traced graph does not "
                          f"have; run --method {first} first, then compress its run with --method {second}")
    return built


def _check_source(source: Path) -> None:
    if not (source / "config.yaml").is_file() or not (source / "checkpoints" / "last.pt").is_file():
        raise AscError(f"{source}: not a trained run (needs config.yaml and checkpoints/last.pt); "
                       "train it with `asc train` first")


def _check_model_kept(source: Path, config: RunConfig, run_overrides: Sequence[str]) -> None:
    """Refuse overrides that change the source's model or features: the compressed run keeps both
    (a width would be ignored, other mels would fine-tune the model on features it was not built for)."""
    trained = load_config(RunConfig, source / "config.yaml")
    if (config.model, config.features) == (trained.model, trained.features):
        return
    fixed = [item for item in run_overrides if item.partition(".")[0] in ("model", "features")]
    alone = {item: load_config(RunConfig, source / "config.yaml", overrides=[item]) for item in fixed}
    changed = next((item for item in fixed if alone[item] != trained), fixed[0])
    raise ConfigError(f"override '{changed}' cannot apply: a compressed run keeps the model and features of "
                      f"{source}; train a run with it, then compress that run")


def _plan(source: Path, methods: Sequence[Method], overrides: Sequence[str]) -> dict[str, Any]:
    return {"source": str(source), "methods": [{"name": m.name, "settings": m.settings()} for m in methods],
            "overrides": list(overrides)}


def float_twin(trainer: Trainer, methods: Sequence[Method]) -> nn.Module:
    """The finalized weights before int8 conversion: unwrapped, masks multiplied in, a copy."""
    model = trainer.model
    for method in reversed(methods):
        model = method.unwrap(model)
    return materialize_masks(copy.deepcopy(model)).eval()


def compress_run(source: Path, out: Path, methods: Sequence[str], overrides: Sequence[str] = (), *,
                 progress: bool = True) -> str:
    """Compress ``source`` into ``out``; returns "finished", "resumed" or "compressed" (idempotent)."""
    source, out = Path(source), Path(out)
    _check_source(source)
    if out.resolve() == source.resolve():
        raise ConfigError(f"{out}: the compressed run needs its own folder; choose another --out")
    run_overrides, options = split_overrides(overrides, methods)
    config = load_config(RunConfig, source / "config.yaml", overrides=run_overrides)
    _check_model_kept(source, config, run_overrides)
    checkpoint = trainable_checkpoint(source)  # an already compressed run: its float twin
    meta = load_checkpoint(checkpoint_file(source, checkpoint))
    features = FeatureConfig.from_dict(meta["features"])
    frames = features.num_frames(meta["num_samples"])
    context = StageContext(source, (1, features.n_mels, frames), config.train.epochs)
    built = build_methods(methods, options, context)
    plan = _plan(source, built, overrides)
    finished = (out / FINALIZED_NAME).is_file()
    resume = (out / "checkpoints" / "last.pt").is_file()
    if (finished or resume) and read_yaml(out / COMPRESS_PLAN_NAME) != plan:
        state = "finished" if finished else "stopped"
        raise AscError(f"{out}: holds a {state} compression with other settings (source, methods or overrides); "
                       "choose another --out, delete it, or repeat the same command")
    if finished:
        return "finished"
    fresh = not out.exists()
    make_dir(out)
    save_yaml(plan, out / COMPRESS_PLAN_NAME)

    def start_model(num_classes: int) -> nn.Module:
        model, state = load_run_model(source, checkpoint)
        if len(state["labels"]) != num_classes:
            raise AscError(f"{source}: the model knows {len(state['labels'])} classes, the data has {num_classes}; "
                           "compress on the data the run was trained on")
        for method in built:
            model = method.prepare(model)
        return model.train()

    trainer = Trainer(config, out, hooks=built, progress=progress, model_factory=start_model)
    try:
        trainer.fit(resume=resume)
    except AscError:
        if fresh and not (out / "checkpoints" / "last.pt").is_file():  # failed in setup: leave nothing behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    _finalize(trainer, built, context, meta)
    return "resumed" if resume else "compressed"


def _finalize(trainer: Trainer, methods: Sequence[Method], context: StageContext, meta: dict[str, Any]) -> None:
    """Materialize, evaluate and write the deployable module; the finalized file is written last.

    Rank 0 alone under torchrun; the report keeps the trainer's per-rank digests.
    """
    from asc.report import write_report

    if not trainer.ctx.is_main:
        return
    out = trainer.run_dir
    quantized = any(method.quantizes for method in methods)
    twin = float_twin(trainer, methods)
    spec = {**meta["model_spec"], "channels": channel_spec(twin)}
    save_checkpoint({"format": meta["format"], "model_spec": spec, "model": twin.state_dict(),
                     "features": meta["features"], "labels": trainer.data.labels, "devices": trainer.data.devices,
                     "num_samples": trainer.data.num_samples, "precision": "int8" if quantized else "fp32"},
                    checkpoint_file(out, FLOAT_CHECKPOINT))
    deployable = trainer.finalized_model()
    metrics = trainer.evaluate(trainer.data.eval, model=deployable)
    features = FeatureConfig.from_dict(meta["features"])
    counts = complexity(twin, (1, *context.input_shape), weight_bytes=1 if quantized else None,
                        one_second_shape=(1, 1, features.n_mels, features.num_frames(features.sample_rate)))
    simulated = trainer.history[-1] if trainer.history else {}
    write_report(out, metrics, history=trainer.history, config=trainer.config, title="Compressed model",
                 extra={"split": trainer.config.data.eval_split, "checkpoint": "finalized",
                        "compression": read_yaml(out / COMPRESS_PLAN_NAME),
                        "precision": "int8" if quantized else "fp32",
                        "simulated_accuracy": simulated.get("accuracy"), **trainer.replicas,
                        "complexity": {"params": counts.params, "nonzero_params": counts.nonzero_params,
                                       "bytes": counts.bytes, "nonzero_bytes": counts.nonzero_bytes,
                                       "macs": counts.macs, "macs_1s": counts.macs_1s}})
    example = torch.zeros((2, *context.input_shape), device=next(twin.parameters()).device)
    save_finalized(deployable, example, out / FINALIZED_NAME)
