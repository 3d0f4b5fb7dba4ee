"""One training loop for every model and every compression method.

The loop owns data, optimisation, evaluation, checkpoints and the run folder; methods plug in
through :class:`~asc.train.hooks.TrainHook`. Randomness is re-seeded from ``(seed, epoch)`` at the
start of every epoch, so a run resumed from its last checkpoint follows exactly the same path as
an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import math
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
from asc.config import RunConfig, save_yaml, to_dict
from asc.data.loader import ClipDataset, DeviceBalancedSampler, make_loader
from asc.errors import AscError
from asc.features import LogMel
from asc.io import atomic_write_text
from asc.models import build_model
from asc.train import distributed
from asc.train.checkpoint import load_checkpoint, save_checkpoint
from asc.train.data import (clip_samples, clipset_devices, make_dataset, open_clipset,
                            split_clips)
from asc.train.evaluate import predict_logits
from asc.train.hooks import TrainHook
from asc.train.translation import needs_waveform, translation_for_run
from asc.train.metrics import Metrics, compute_metrics

CHECKPOINT_FORMAT = 1


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


def make_optimizer(config: RunConfig, params: Iterator[nn.Parameter]) -> torch.optim.Optimizer:
    optim = config.optim
    if optim.name == "sgd":
        return torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay,
                               nesterov=optim.momentum > 0)
    return torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)


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
        self.best: dict[str, Any] | None = None

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
        for hook in self.hooks:
            model = hook.wrap_model(model)
        self.model = model.to(device)
        self.train_model: nn.Module = (
            DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
            if self.ctx.enabled else self.model)
        self.optimizer = make_optimizer(config, (p for p in self.model.parameters() if p.requires_grad))
        self.extra_optimizers = [opt for hook in self.hooks for opt in hook.extra_optimizers(self.model)]
        self.steps_per_epoch = len(self._train_loader(0))
        total = self.steps_per_epoch * config.train.epochs
        warmup = int(round(config.optim.warmup_epochs * self.steps_per_epoch))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(total, warmup))
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
            outputs = next((out for hook in self.hooks
                            if (out := hook.forward(self, self.train_model, x)) is not None), None)
            if outputs is None:
                outputs = {"logits": self.train_model(x)}
            loss = task_loss(outputs["logits"], self.batch)
            for hook in self.hooks:
                for term in hook.extra_losses(self, outputs, labels).values():
                    loss = loss + term
        optimizers = [self.optimizer, *self.extra_optimizers]
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for hook in self.hooks:
            hook.after_backward(self)
        if self.config.optim.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.optim.grad_clip)
        for opt in optimizers:
            opt.step()
        self.scheduler.step()
        self.step += 1
        for hook in self.hooks:
            hook.after_step(self)
        return float(loss.detach())

    def _train_epoch(self, epoch: int) -> float:
        seed = epoch_seed(self.config.train.seed, epoch)
        torch.manual_seed(seed)
        self.aug_generator.manual_seed(seed)
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
            "optimizer": self.optimizer.state_dict(),
            "extra_optimizers": [opt.state_dict() for opt in self.extra_optimizers],
            "scheduler": self.scheduler.state_dict(),
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
        self.optimizer.load_state_dict(state["optimizer"])
        for opt, opt_state in zip(self.extra_optimizers, state["extra_optimizers"], strict=True):
            opt.load_state_dict(opt_state)
        self.scheduler.load_state_dict(state["scheduler"])
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
        if self.ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_yaml(to_dict(self.config), self.run_dir / "config.yaml")
        self._setup()
        if resume:
            self._restore(load_checkpoint(self.checkpoint_dir / "last.pt", self.ctx.device))
        epochs = self.config.train.epochs
        metrics = None
        while self.epoch < epochs:
            loss = self._train_epoch(self.epoch)
            distributed.sync_buffers(self.ctx, self.model)
            self.epoch += 1
            if self.ctx.is_main:
                metrics = self.evaluate(self.data.eval)
                entry = {"epoch": self.epoch, "step": self.step, "train_loss": loss,
                         "lr": self.scheduler.get_last_lr()[0], **metrics.summary()}
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
        if self.ctx.is_main:
            if metrics is None:  # resumed a finished run: report the stored model
                metrics = self.evaluate(self.data.eval)
            write_report(self.run_dir, metrics, history=self.history, config=self.config,
                         extra={"split": self.config.data.eval_split, "checkpoint": "last",
                                "world_size": self.ctx.world_size, "parameter_digests": digests,
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

    Returns "finished", "resumed" or "trained". A stopped run with other settings is an error,
    so a recipe never silently mixes two configurations in one folder.
    """
    run_dir = Path(run_dir)
    if (run_dir / "report.json").is_file():
        return "finished"
    resume = (run_dir / "checkpoints" / "last.pt").is_file()
    if resume:
        from asc.config import load_config

        if to_dict(load_config(RunConfig, run_dir / "config.yaml")) != to_dict(config):
            raise AscError(f"{run_dir}: holds a stopped run with other settings; delete it or resume it with "
                           "the same settings")
    Trainer(config, run_dir, hooks=hooks, progress=progress).fit(resume=resume)
    return "resumed" if resume else "trained"
