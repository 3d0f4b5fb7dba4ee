"""PQK: pruning, quantization and self-distillation from the pruned weights (methods.md §4).

A composition of the building blocks, not a copy of them:

* phase 1 — :class:`~asc.compress.methods.PruneMethod` in keep-values mode ramps the sparsity
  while :class:`~asc.compress.methods.QATMethod` trains the masked student through int8
  fake-quant. Pruned weights keep their values: they are neither used nor updated.
* phase 2 — the teacher is the dense tensor (kept + pruned weights) in float with its own batch
  norms; :class:`~asc.compress.kd.Distillation` adds ``T² KL(teacher || student)`` to the
  student's loss, and the teacher learns from the labels. Gradients are routed by construction:
  the student sees ``w * mask`` (so its losses reach only kept weights) and the teacher is the
  :class:`~asc.compress.dense_path.DensePath` that DCIL uses too (``where(mask, w.detach(), w)``,
  so its loss reaches only pruned weights; every other shared tensor, such as the stem, the
  classifier and the student's norms, is detached in the teacher's path).

The two phases are declared (``prune-quantize`` for the first ``phase2`` of the run, then
``self-distil``), so the loop announces them, logs them per epoch and resumes into the right one.
The teacher's norms are an auxiliary module whose forward is the teacher: the trainer optimizes,
schedules, clips, checkpoints and DDP-wraps them like the model (so under DDP their gradients are
all-reduced). Only the student is finalized: masks applied, then converted to the int8 graph;
the pruned values and the teacher's norms are dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from asc.compress.base import Job, Method, StageContext, parse_options, register
from asc.compress.dense_path import DensePath, batch_norm_names
from asc.compress.kd import Distillation, SelfTeacher
from asc.compress.methods import PruneMethod, PruneOptions, QATMethod
from asc.compress.quant import QATConfig
from asc.errors import ConfigError
from asc.train.hooks import Auxiliary, Phase, phase_starts

if TYPE_CHECKING:
    from asc.train.loop import Trainer


@dataclass
class PQKOptions:
    sparsity: float = 0.8  #: final fraction of zero weights in the pruned layers
    scope: str = "global"
    prune_end: float = 0.4  #: fraction of the steps at which the sparsity is reached (phase 1)
    every: int = 16  #: mask refresh interval in steps during the ramp
    phase2: float = 0.5  #: fraction of the epochs after which the self-teacher distils
    temperature: float = 2.0
    kd_weight: float = 1.0  #: weight of the student's distillation term
    teacher_weight: float = 1.0  #: weight of the teacher's cross-entropy
    freeze_bn_epochs: int = QATConfig.freeze_bn_epochs
    freeze_observer_epochs: int = QATConfig.freeze_observer_epochs

    def __post_init__(self) -> None:
        if not 0.0 <= self.prune_end <= self.phase2 <= 1.0:
            raise ConfigError(f"pqk: need 0 <= prune_end ({self.prune_end}) <= phase2 ({self.phase2}) <= 1: the "
                              "masks must be final before the self-teacher starts; fix pqk.prune_end/pqk.phase2")


PHASE1, PHASE2 = "prune-quantize", "self-distil"


@register
class PQK(Method):
    """Prune + int8 QAT (phase 1), then distillation from the pruned weights added back (phase 2)."""

    name = "pqk"
    jobs = frozenset({Job.MASKS, Job.QUANTIZATION, Job.DISTILLATION})
    quantizes = True

    def __init__(self, options: PQKOptions, context: StageContext) -> None:
        self.options = options
        self.pruning = PruneMethod(PruneOptions(sparsity=options.sparsity, scope=options.scope, end=options.prune_end,
                                                every=options.every), keep_pruned_values=True,
                                   last_step=self.teacher_step)
        self.qat = QATMethod(context.input_shape, QATConfig(freeze_bn_epochs=options.freeze_bn_epochs,
                                                            freeze_observer_epochs=options.freeze_observer_epochs))
        self.distillation = Distillation(SelfTeacher(self.teacher_logits), temperature=options.temperature,
                                         weight=options.kd_weight)
        self.dense_path: DensePath | None = None  #: the teacher, made when the model is wrapped
        self.teacher: Auxiliary | None = None  #: the dense path as the trainer owns it (and DDP-wraps it)
        self.teaching = False
        self.teacher_ready = False

    @classmethod
    def build(cls, options: Mapping[str, Any], context: StageContext) -> PQK:
        return cls(parse_options(PQKOptions, options, cls.name), context)

    # -- the two paths

    def _dense(self) -> DensePath:
        if self.dense_path is None:
            raise ConfigError("pqk: the model was not wrapped yet; the stage wraps it before training")
        return self.dense_path

    def _teacher(self) -> Auxiliary:
        if self.teacher is None:
            raise ConfigError("pqk: the model was not wrapped yet; the stage wraps it before training")
        return self.teacher

    @property
    def norm_names(self) -> list[str]:
        return self._dense().names

    @property
    def teacher_norms(self) -> nn.ModuleList:
        """The teacher's own batch norms, in the order of :attr:`norm_names`."""
        return self._dense().owned

    def teacher_logits(self, x: Tensor) -> Tensor:
        """The dense float network with the teacher's norms; gradients reach only pruned weights."""
        return self._teacher()(x)

    def _start_teacher(self) -> None:
        """The teacher's norms start as copies of the student's when phase 2 begins."""
        self._dense().restart()
        self.teacher_ready = True

    # -- declarations

    def phases(self) -> tuple[Phase, Phase]:
        return Phase(PHASE1, fraction=self.options.phase2), Phase(PHASE2)

    def auxiliaries(self) -> dict[str, Auxiliary]:
        return {"teacher_norms": self._teacher()}

    def output_keys(self) -> frozenset[str]:
        return frozenset({"logits", "teacher_logits"})

    # -- hook points

    def wrap_model(self, model: nn.Module) -> nn.Module:
        self.dense_path = DensePath(model, self.pruning, batch_norm_names(model))
        self.teacher = Auxiliary(self.dense_path)
        return self.qat.wrap_model(self.pruning.wrap_model(model))

    def unwrap(self, model: nn.Module) -> nn.Module:
        return self._dense().model

    def setup(self, trainer: Trainer) -> None:
        self.qat.setup(trainer)
        self.pruning.setup(trainer)

    def teacher_step(self, trainer: Trainer) -> int:
        """The self-teacher's first step. prune_end <= phase2 holds as fractions, but steps and epochs
        round apart (5 epochs at 0.5: step 10 of 20 against epoch 2), so the ramp is also capped here."""
        return phase_starts(self.phases(), trainer.config.train.epochs)[1] * trainer.steps_per_epoch

    def on_phase_start(self, trainer: Trainer, phase: Phase) -> None:
        self.teaching = phase.name == PHASE2
        if self.teaching and not self.teacher_ready:  # a resumed run restored the teacher already
            self._start_teacher()

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        self.qat.on_epoch_start(trainer, epoch)

    def forward(self, trainer: Trainer, model: nn.Module, x: Tensor) -> dict[str, Tensor]:
        outputs = self.pruning.forward(trainer, model, x)
        if self.teaching:
            outputs["teacher_logits"] = self.teacher_logits(x)
        return outputs

    def extra_losses(self, trainer: Trainer, outputs: dict[str, Tensor], targets: Tensor) -> dict[str, Tensor]:
        from asc.train.loop import task_loss

        if not self.teaching:
            return {}
        losses = self.distillation.extra_losses(trainer, outputs, targets)
        losses["teacher"] = self.options.teacher_weight * task_loss(outputs["teacher_logits"], trainer.batch)
        return losses

    def after_step(self, trainer: Trainer) -> None:
        self.pruning.after_step(trainer)

    def eval_forward(self, trainer: Trainer, model: nn.Module, x: Tensor) -> Tensor:
        return self.pruning.eval_forward(trainer, model, x)

    def finalize(self, model: nn.Module) -> nn.Module:
        return self.qat.finalize(self.pruning.finalize(model))

    def state_dict(self) -> dict[str, Any]:
        return {"pruning": self.pruning.state_dict(), "qat": self.qat.state_dict(), "teacher_ready": self.teacher_ready}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pruning.load_state_dict(state["pruning"])
        self.qat.load_state_dict(state["qat"])
        self.teacher_ready = bool(state["teacher_ready"])

    def settings(self) -> dict[str, Any]:
        return asdict(self.options)

