"""One training loop for every model and every compression method.

The loop owns data, optimisation, evaluation, checkpoints and the run folder; methods plug in
through :class:`~asc.train.hooks.TrainHook`, and the loop also owns what they declare: phases,
auxiliary modules, feature taps and named loss terms. Randomness is re-seeded from
``(seed, epoch)`` at the start of every epoch, so a run resumed from its last checkpoint follows
exactly the same path as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import math
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from tqdm import tqdm

from asc.augment import MixedBatch, build_augmentations, build_mixup, mixup_loss
from asc.config import OptimizerName, RunConfig, save_yaml, to_dict
from asc.data.loader import ClipDataset, DeviceBalancedSampler, make_loader
from asc.errors import AscError, ConfigError
from asc.features import LogMel
from asc.io import atomic_write_text, make_dir
from asc.models import build_model
from asc.models.registry import feature_taps
from asc.train import distributed
from asc.train.checkpoint import load_checkpoint, save_checkpoint
from asc.train.data import (
    clip_samples,
    clipset_devices,
    make_dataset,
    open_clipset,
    split_clips,
)
from asc.train.evaluate import predict_logits
from asc.train.hooks import Auxiliary, Phase, TrainHook, phase_at, phase_starts
from asc.train.metrics import Metrics, compute_metrics
from asc.train.translation import needs_waveform, translation_for_run

CHECKPOINT_FORMAT = 2  #: 2: optimizers/schedulers per step order and auxiliary modules


@dataclass
class RunData:
    """The datasets and vocabularies of a run."""

    labels: list[str]
    devices: list[str]
    num_samples: int
    train: ClipDataset
    eval: ClipDataset
    features_cached: bool


@dataclass
class BatchInfo:
    """What hooks may need about the current training batch beyond its inputs."""

    indices: Tensor  #: positions of the clips in the training dataset (for precomputed teacher logits)
    labels: Tensor
    devices: Tensor  #: device ids after augmentation (translated clips count as their target)
    mix: MixedBatch | None  #: the mixup pairing, so soft targets can be mixed like the inputs


def task_loss(logits: Tensor, batch: BatchInfo) -> Tensor:
    """Cross-entropy against the batch's labels, mixed like the inputs when mixup is on."""
    if batch.mix is not None:
        return mixup_loss(logits.float(), batch.labels, batch.mix.perm, batch.mix.lam)
    return F.cross_entropy(logits.float(), batch.labels)


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


def warmup_cosine(total_steps: int, warmup_steps: int):
    """Learning-rate factor: linear warm-up, then cosine decay to zero."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


ParamGroups = list[dict[str, Any]]


def make_optimizer(config: RunConfig, params: Iterator[nn.Parameter] | ParamGroups,
                   name: OptimizerName | None = None) -> torch.optim.Optimizer:
    """The configured optimizer (or another kind, ``name``) with the run's hyperparameters as defaults;
    parameter groups may set their own ``lr`` and ``weight_decay``."""
    optim = config.optim
    if (name or optim.name) == "sgd":
        return torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay,
                               nesterov=optim.momentum > 0)
    return torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)


def _aux_group(aux: Auxiliary) -> dict[str, Any]:
    group: dict[str, Any] = {"params": [p for p in aux.module.parameters() if p.requires_grad]}
    if aux.lr is not None:
        group["lr"] = aux.lr
    if aux.weight_decay is not None:
        group["weight_decay"] = aux.weight_decay
    return group


def model_spec(config: RunConfig, num_classes: int) -> dict[str, Any]:
    return {"name": config.model.name, "args": dict(config.model.args), "num_classes": num_classes}


def parameter_digest(model: nn.Module) -> str:
    """A hash of every parameter and buffer, to prove replicas hold identical weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


ModelFactory = Callable[[int], nn.Module]
"""Builds the starting model for a number of classes (default: a fresh one from the config)."""


class Trainer:
    """Trains ``config`` into ``run_dir``; see the module docstring for the guarantees.

    ``model_factory`` replaces the fresh model, e.g. with trained weights to compress. It must
    return the same model every time it is called, because a resumed run calls it again.
    """

    def __init__(self, config: RunConfig, run_dir: Path, hooks: Sequence[TrainHook] = (),
                 progress: bool = True, model_factory: ModelFactory | None = None) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.hooks = list(hooks)
        self.progress = progress
        self.model_factory = model_factory
        self.ctx = distributed.setup(config.train.device)
        self.epoch = 0
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.replicas: dict[str, Any] = {}  #: world size and per-rank digests, set when training ends
        self.best: dict[str, Any] | None = None
        self.auxiliaries: dict[str, Auxiliary] = {}
        self.phases: dict[str, Phase] = {}  #: current phase of every hook that declares phases
        self._taps: dict[str, Tensor] = {}
        self._tapping = False
        self._terms: dict[str, list[Tensor]] = {}

    # ------------------------------------------------------------------ setup

    def _prepare_data(self) -> RunData:
        config = self.config
        show = self.progress and self.ctx.is_main
        if self.ctx.is_main:  # rank 0 creates the corpus and fills the caches, the others reuse them
            clipset = open_clipset(config.data, progress=show)
        distributed.barrier(self.ctx)
        if not self.ctx.is_main:
            clipset = open_clipset(config.data, progress=False)
        train_clips = split_clips(clipset, config.data.train_split)
        eval_clips = split_clips(clipset, config.data.eval_split)
        num_samples = clip_samples(config.data, config.features, train_clips)
        devices = clipset_devices(clipset)
        as_features = config.data.cache_features and not needs_waveform(config.augment)

        def build(clips, announce):
            return make_dataset(clips, clipset, devices, config=config.data, features=config.features,
                                num_samples=num_samples, as_features=as_features, progress=announce)

        if self.ctx.is_main:
            train, evaluation = build(train_clips, show), build(eval_clips, show)
        distributed.barrier(self.ctx)
        if not self.ctx.is_main:
            train, evaluation = build(train_clips, False), build(eval_clips, False)
        return RunData(clipset.labels, devices, num_samples, train, evaluation, as_features)

    def _setup(self) -> None:
        config, device = self.config, self.ctx.device
        torch.manual_seed(config.train.seed)
        self.data = self._prepare_data()
        self.frontend = LogMel(config.features).to(device)
        num_classes = len(self.data.labels)
        model = (self.model_factory(num_classes) if self.model_factory is not None
                 else build_model(config.model.name, num_classes, **config.model.args)).to(device)
        tapped = self._tap_modules(model)
        for hook in self.hooks:
            model = hook.wrap_model(model)
        self.model = model.to(device)
        for name, module in tapped.items():  # after wrapping, so that tracing (QAT export) never sees them
            module.register_forward_hook(self._tap_hook(name))
        self.train_model = self._ddp(self.model)
        self._producer = self._logits_producer()
        self._register_auxiliaries()
        self.steps_per_epoch = len(self._train_loader(0))
        total = self.steps_per_epoch * config.train.epochs
        warmup = int(round(config.optim.warmup_epochs * self.steps_per_epoch))
        self._build_optimizers(warmup_cosine(total, warmup))
        self.aug_generator = torch.Generator()
        translation_model = None
        if config.augment.translation != "none":
            translation_model = translation_for_run(self)
        self.wave_augment, self.spec_augment = build_augmentations(
            config.augment, self.data.devices, config.features.sample_rate, generator=self.aug_generator,
            translation_model=translation_model)
        self.mixup = build_mixup(config.augment)
        for hook in self.hooks:
            hook.setup(self)
            if hook.phases():  # phases longer than the run are a config error before training
                phase_starts(hook.phases(), config.train.epochs)

    def _ddp(self, module: nn.Module, *, find_unused: bool = False) -> nn.Module:
        if not self.ctx.enabled:
            return module
        device = self.ctx.device
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                       find_unused_parameters=find_unused)

    def _tap_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        wanted = {name for hook in self.hooks for name in hook.feature_taps()}
        if not wanted:
            return {}
        stages = feature_taps(model)
        unknown = sorted(wanted - stages.keys())
        if unknown:
            raise ConfigError(f"feature taps {unknown} are not stages of {type(model).__name__}; "
                              f"valid: {', '.join(stages)}")
        return {name: stages[name] for name in sorted(wanted)}

    def _tap_hook(self, name: str) -> Callable[..., None]:
        def record(module: nn.Module, inputs: Any, output: Tensor) -> None:
            if self._tapping and name not in self._taps:  # the first call of a step is the student's
                self._taps[name] = output

        return record

    def feature(self, name: str) -> Tensor:
        """The output of model stage ``name`` in this step's student forward (see ``feature_taps``)."""
        if name not in self._taps:
            raise AscError(f"feature tap {name!r} did not run in this step: declare it in feature_taps() and train "
                           "a float module (an exported QAT graph has no stage modules to tap)")
        return self._taps[name]

    def _logits_producer(self) -> TrainHook | None:
        producers = [hook for hook in self.hooks if "logits" in hook.output_keys()]
        if len(producers) > 1:
            raise ConfigError(f"hooks {', '.join(h.label for h in producers)} all replace the model's forward "
                              "(they return 'logits'); keep one")
        return producers[0] if producers else None

    def _register_auxiliaries(self) -> None:
        for hook in self.hooks:
            for key, aux in hook.auxiliaries().items():
                name = f"{hook.label}.{key}"
                if name in self.auxiliaries:
                    raise ConfigError(f"two hooks register the auxiliary module {name!r}; give them distinct names")
                aux.module.to(self.ctx.device)
                if not aux.trainable:
                    aux.module.requires_grad_(False)
                elif any(p.requires_grad for p in aux.module.parameters()):
                    aux.runner = self._ddp(aux.module, find_unused=True)  # used in some phases only
                self.auxiliaries[name] = aux

    def _build_optimizers(self, factor: Callable[[int], float]) -> None:
        """One optimizer per step order (the model's is order 0), each on the shared schedule."""
        groups: dict[int, ParamGroups] = {0: [{"params": [p for p in self.model.parameters() if p.requires_grad]}]}
        kinds: dict[int, tuple[str, OptimizerName | None]] = {0: ("the model", None)}
        for name, aux in self.auxiliaries.items():
            if aux.trainable:
                owner, kind = kinds.setdefault(aux.step_order, (name, aux.optimizer))
                if kind != aux.optimizer:
                    wanted, used = aux.optimizer or "the run's optimizer", kind or "the run's optimizer"
                    raise ConfigError(f"auxiliary {name!r} asks for {wanted} at step order {aux.step_order}, where "
                                      f"{owner} uses {used}; one optimizer kind per step order")
                groups.setdefault(aux.step_order, []).append(_aux_group(aux))
        self.optimizers = [make_optimizer(self.config, groups[order], kinds[order][1]) for order in sorted(groups)]
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, factor) for opt in self.optimizers]
        main = sorted(groups).index(0)
        self.optimizer, self.scheduler = self.optimizers[main], self.schedulers[main]
        self._trained = [p for opt in self.optimizers for group in opt.param_groups for p in group["params"]]

    def trained_parameters(self) -> list[nn.Parameter]:
        """Every parameter an optimizer updates: the model's and the trainable auxiliaries'."""
        return self._trained

    def _train_loader(self, epoch: int) -> DataLoader:
        config = self.config
        sampler: Sampler[int] | None = None
        if self.ctx.enabled:
            world, rank = self.ctx.world_size, self.ctx.rank
            if config.data.balanced_devices:
                names = [clip.device for clip in self.data.train.clips]
                sampler = DeviceBalancedSampler(names, seed=config.train.seed, num_replicas=world, rank=rank)
            else:
                sampler = DistributedSampler(self.data.train, num_replicas=world, rank=rank, shuffle=True,
                                             seed=config.train.seed, drop_last=True)
            sampler.set_epoch(epoch)
        return make_loader(self.data.train, batch_size=config.train.batch_size, train=True,
                           balanced_devices=config.data.balanced_devices, seed=epoch_seed(config.train.seed, epoch),
                           num_workers=config.data.num_workers, drop_last=True, sampler=sampler)

    # ------------------------------------------------------------------ steps

    def features(self, x: Tensor) -> Tensor:
        """Log-mels of a batch: computed here unless the dataset already holds them."""
        return x if self.data.features_cached else self.frontend(x)

    def _autocast(self):
        if self.config.train.amp and self.ctx.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _train_step(self, batch: tuple[Tensor, Tensor, Tensor, Tensor]) -> float:
        device = self.ctx.device
        x, labels, devices, indices = (t.to(device, non_blocking=True) for t in batch)
        if not self.data.features_cached:
            x = self.wave_augment(x, devices)
        with torch.no_grad():
            x = self.features(x)
        x, devices = self.spec_augment(x, devices)
        mix = self.mixup(x, self.aug_generator) if self.mixup else None
        if mix is not None:
            x = mix.x
        self.batch = BatchInfo(indices, labels, devices, mix)
        with self._autocast():
            outputs = self._forward(x)
            terms = self._loss_terms(outputs, labels)
            loss = sum(terms.values())
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for hook in self.hooks:
            hook.after_backward(self)
        if self.config.optim.grad_clip:
            nn.utils.clip_grad_norm_(self._trained, self.config.optim.grad_clip)
        for opt in self.optimizers:
            opt.step()
        for scheduler in self.schedulers:
            scheduler.step()
        self.step += 1
        for name, term in terms.items():
            self._terms.setdefault(name, []).append(term.detach())  # to floats once an epoch: no sync per step
        for hook in self.hooks:
            hook.after_step(self)
        return float(loss.detach())

    def _forward(self, x: Tensor) -> dict[str, Tensor]:
        """The student's forward (the model, or the hook that replaces it), then every hook's outputs."""
        self._taps.clear()
        self._tapping = True
        try:
            produced = self._producer.forward(self, self.train_model, x) if self._producer else None
            outputs = dict(produced) if produced is not None else {"logits": self.train_model(x)}
        finally:
            self._tapping = False
        for hook in self.hooks:
            if hook is self._producer:
                continue
            for key, value in (hook.forward(self, self.train_model, x) or {}).items():
                if key in outputs:
                    raise ConfigError(f"{hook.label} returns {key!r}, which another hook already returned; "
                                      "declare output_keys() so the clash is refused before training")
                outputs[key] = value
        return outputs

    def _loss_terms(self, outputs: dict[str, Tensor], labels: Tensor) -> dict[str, Tensor]:
        """The task loss (unless a current phase switches it off) and every hook's named terms."""
        terms: dict[str, Tensor] = {}
        if all(phase.task_loss for phase in self.phases.values()):
            terms["task"] = task_loss(outputs["logits"], self.batch)
        for hook in self.hooks:
            for name, term in hook.extra_losses(self, outputs, labels).items():
                terms[f"{hook.label}.{name}"] = term
        if not terms:
            raise ConfigError(f"no loss term in phases {self.phases}: a phase switched the task loss off and no "
                              "hook added one")
        return terms

    def _enter_phases(self, epoch: int) -> None:
        """Announce and start each hook's phase when it changes (and the one a resumed run lands in)."""
        for hook in self.hooks:
            phases = hook.phases()
            if not phases:
                continue
            phase = phase_at(phases, epoch, self.config.train.epochs)
            if self.phases.get(hook.label) != phase:
                self.phases[hook.label] = phase
                if self.progress and self.ctx.is_main:
                    tqdm.write(f"epoch {epoch + 1}: {hook.label} enters phase {phase.name!r}")
                hook.on_phase_start(self, phase)

    def _train_epoch(self, epoch: int) -> float:
        seed = epoch_seed(self.config.train.seed, epoch)
        torch.manual_seed(seed)
        self.aug_generator.manual_seed(seed)
        self._enter_phases(epoch)
        self._terms = {}
        for hook in self.hooks:
            hook.on_epoch_start(self, epoch)
        self.train_model.train()
        loader = self._train_loader(epoch)
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{self.config.train.epochs}", leave=False,
                   disable=not (self.progress and self.ctx.is_main), dynamic_ncols=True)
        losses = []
        for batch in bar:
            losses.append(self._train_step(batch))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if not losses:
            raise AscError(f"{self.run_dir}: the training split is smaller than one batch "
                           f"({len(self.data.train)} clips, batch {self.config.train.batch_size}); "
                           "lower train.batch_size")
        return float(np.mean(losses))

    # ------------------------------------------------------------------ evaluation

    def _eval_forward(self, x: Tensor) -> Tensor:
        logits = next((out for hook in self.hooks
                       if (out := hook.eval_forward(self, self.model, x)) is not None), None)
        return logits if logits is not None else self.model(x)

    def predict(self, dataset: ClipDataset, model: nn.Module | None = None) -> np.ndarray:
        """Logits of the deploy path (or of another ``model``, e.g. a finalized one) for every clip."""
        self.model.eval()
        if model is not None:
            model.eval()
        return predict_logits(dataset, self._eval_forward if model is None else model,
                              frontend=None if self.data.features_cached else self.frontend,
                              device=self.ctx.device, batch_size=self.config.train.eval_batch_size,
                              progress=self.progress and self.ctx.is_main)

    def evaluate(self, dataset: ClipDataset, model: nn.Module | None = None) -> Metrics:
        logits = self.predict(dataset, model)
        return compute_metrics(logits, dataset.targets, [c.device for c in dataset.clips], self.data.labels)

    # ------------------------------------------------------------------ persistence

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def _state(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": self.epoch,
            "step": self.step,
            "model": self.model.state_dict(),
            "auxiliaries": {name: aux.module.state_dict() for name, aux in self.auxiliaries.items() if aux.trainable},
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "schedulers": [scheduler.state_dict() for scheduler in self.schedulers],
            "hooks": [hook.state_dict() for hook in self.hooks],
            "history": self.history,
            "best": self.best,
            "model_spec": model_spec(self.config, len(self.data.labels)),
            "features": self.config.features.to_dict(),
            "labels": self.data.labels,
            "devices": self.data.devices,
            "num_samples": self.data.num_samples,
        }

    def _restore(self, state: dict[str, Any]) -> None:
        path = self.checkpoint_dir / "last.pt"
        if state.get("format") != CHECKPOINT_FORMAT:
            raise AscError(f"{path}: checkpoint format {state.get('format')} is not {CHECKPOINT_FORMAT}; "
                           "it was written by another asc version, start a new run")
        if state["labels"] != self.data.labels:
            raise AscError(f"{path}: trained on labels {state['labels']}, the data has {self.data.labels}; "
                           "resume with the same dataset")
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as error:
            raise AscError(f"{path}: does not fit the configured model ({str(error).splitlines()[0]}); "
                           "resume with the run's own config.yaml") from None
        stored = state["auxiliaries"]
        trained = sorted(name for name, aux in self.auxiliaries.items() if aux.trainable)
        if sorted(stored) != trained:
            raise AscError(f"{path}: holds auxiliary modules {sorted(stored)}, the hooks now have {trained}; "
                           "resume with the run's own methods")
        for name in trained:
            self.auxiliaries[name].module.load_state_dict(stored[name])
        for opt, opt_state in zip(self.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(opt_state)
        for scheduler, scheduler_state in zip(self.schedulers, state["schedulers"], strict=True):
            scheduler.load_state_dict(scheduler_state)
        for hook, hook_state in zip(self.hooks, state["hooks"], strict=True):
            hook.load_state_dict(hook_state)
        self.epoch, self.step = state["epoch"], state["step"]
        self.history, self.best = list(state["history"]), state["best"]

    def _write_epoch(self, metrics: Metrics) -> None:
        import json

        state = self._state()
        save_checkpoint(state, self.checkpoint_dir / "last.pt")
        if self.best is not None and self.best["epoch"] == self.epoch:
            save_checkpoint(state, self.checkpoint_dir / "best.pt")
        lines = "".join(json.dumps(entry) + "\n" for entry in self.history)
        atomic_write_text(self.run_dir / "metrics.jsonl", lines)

    # ------------------------------------------------------------------ run

    def finalized_model(self) -> nn.Module:
        """The deployable module: every hook's finalize (apply masks, convert fake-quant, …) in turn."""
        finalized = self.model
        for hook in self.hooks:
            finalized = hook.finalize(finalized)
        return finalized

    def fit(self, resume: bool = False) -> Metrics:
        """Train to ``train.epochs`` (continuing from ``checkpoints/last.pt`` when resuming)."""
        fresh = not resume and not self.run_dir.exists()
        if self.ctx.is_main:
            make_dir(self.run_dir)
            save_yaml(to_dict(self.config), self.run_dir / "config.yaml")
        try:
            self._setup()
        except Exception:
            if fresh and self.ctx.is_main:  # a bad model or data setting must not leave a half-made run
                shutil.rmtree(self.run_dir, ignore_errors=True)
            raise
        if resume:
            self._restore(load_checkpoint(self.checkpoint_dir / "last.pt", self.ctx.device))
        epochs = self.config.train.epochs
        metrics = None
        while self.epoch < epochs:
            loss = self._train_epoch(self.epoch)
            distributed.sync_buffers(self.ctx, self.model)
            for aux in self.auxiliaries.values():
                distributed.sync_buffers(self.ctx, aux.module)
            self.epoch += 1
            if self.ctx.is_main:
                metrics = self.evaluate(self.data.eval)
                entry = {"epoch": self.epoch, "step": self.step, "train_loss": loss,
                         "lr": self.scheduler.get_last_lr()[0],
                         "losses": {name: float(torch.stack(values).double().mean())
                                    for name, values in self._terms.items()},
                         **({"phases": {label: phase.name for label, phase in self.phases.items()}}
                            if self.phases else {}),
                         **metrics.summary()}
                self.history.append(entry)
                if self.best is None or metrics.accuracy > self.best["accuracy"]:
                    self.best = {"epoch": self.epoch, "accuracy": metrics.accuracy}
                self._write_epoch(metrics)
                if self.progress:
                    tqdm.write(f"epoch {self.epoch}/{epochs}  loss {loss:.4f}  "
                               f"acc {metrics.accuracy:.4f}  log loss {metrics.log_loss:.4f}")
            distributed.barrier(self.ctx)
        return self._finish(metrics)

    def _finish(self, metrics: Metrics | None) -> Metrics:
        from asc.report import write_report

        digests = distributed.gather_objects(self.ctx, parameter_digest(self.model))
        if len(set(digests)) != 1:
            raise RuntimeError(f"DDP replicas diverged: parameter digests {digests}")
        trained = {name: aux.module for name, aux in self.auxiliaries.items() if aux.trainable}
        # per rank {name: digest} of the trained auxiliaries (teachers, peers): DDP-wrapped like the model
        aux_digests = distributed.gather_objects(self.ctx, {name: parameter_digest(module)
                                                            for name, module in trained.items()})
        if any(rank != aux_digests[0] for rank in aux_digests):
            raise RuntimeError(f"DDP replicas diverged: auxiliary module digests {aux_digests}")
        self.replicas = {"world_size": self.ctx.world_size, "parameter_digests": digests,
                         **({"auxiliary_digests": {name: [rank[name] for rank in aux_digests]
                                                   for name in trained}} if trained else {})}
        if self.ctx.is_main:
            if metrics is None:  # resumed a finished run: report the stored model
                metrics = self.evaluate(self.data.eval)
            write_report(self.run_dir, metrics, history=self.history, config=self.config,
                         extra={"split": self.config.data.eval_split, "checkpoint": "last", **self.replicas,
                                "parameters": sum(p.numel() for p in self.model.parameters())})
        distributed.barrier(self.ctx)
        # Release DDP's reducer while the process group is still registered: if the reducer is
        # the group's last owner, its deallocation (GIL held, e.g. at interpreter exit) destroys
        # the gloo group and can deadlock with a gloo worker thread that needs the GIL to free
        # the tensors of the last all_gather_object (seen once in CI).
        self.train_model = self.model
        gc.collect()
        distributed.teardown(self.ctx)
        return metrics


def train_or_resume(config: RunConfig, run_dir: Path, *, hooks: Sequence[TrainHook] = (),
                    progress: bool = True) -> str:
    """Train into ``run_dir`` idempotently: skip a finished run, resume a stopped one, else start.

    Returns "finished", "resumed" or "trained". A finished or stopped run with other settings is
    an error, so a recipe or a cross-validation never silently reuses or mixes another configuration.
    """
    run_dir = Path(run_dir)
    finished = (run_dir / "report.json").is_file()
    resume = not finished and (run_dir / "checkpoints" / "last.pt").is_file()
    if finished or resume:
        from asc.config import load_config

        if to_dict(load_config(RunConfig, run_dir / "config.yaml")) != to_dict(config):
            raise AscError(f"{run_dir}: holds a {'finished' if finished else 'stopped'} run with other settings; "
                           "choose another --out, delete it, or repeat the same settings")
    if finished:
        return "finished"
    Trainer(config, run_dir, hooks=hooks, progress=progress).fit(resume=resume)
    return "resumed" if resume else "trained"
