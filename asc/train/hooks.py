"""Hook points of the training loop, and what a plugin declares to it.

Compression methods (pruning, quantization-aware training, distillation, …) are plugins that
override some of these methods; the loop itself never knows which method is active. Every method
has a neutral default, so a hook implements only what it needs.

Besides the per-step calls, a hook declares four things the loop manages for it:

* :meth:`TrainHook.phases` — named stretches of the run (PQK 1 → 2, QKD SS → CS → TU); the loop
  announces each change, logs the phase per epoch and lands a resumed run in the right one;
* :meth:`TrainHook.auxiliaries` — modules beside the model (teachers, peers, discriminators): the
  loop places them, optimizes, schedules, clips, checkpoints and DDP-wraps them like the model;
* :meth:`TrainHook.feature_taps` — stage names whose outputs it reads (``trainer.feature(name)``);
* :meth:`TrainHook.output_keys` — the keys its :meth:`TrainHook.forward` adds, so two plugins that
  would write the same key are refused before training.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

from asc.config import OptimizerName
from asc.errors import ConfigError

if TYPE_CHECKING:
    from asc.train.loop import Trainer


@dataclass(frozen=True)
class Phase:
    """A named stretch of a hook's schedule, ``epochs`` long or ``fraction`` of the run.

    A phase without a length lasts to the end (only the last may leave it out). ``task_loss``
    False switches the loop's cross-entropy off while the phase lasts; a hook that replaces it
    adds its own term through :meth:`TrainHook.extra_losses`.
    """

    name: str
    epochs: int | None = None
    fraction: float | None = None
    task_loss: bool = True

    def __post_init__(self) -> None:
        if self.epochs is not None and self.fraction is not None:
            raise ConfigError(f"phase {self.name!r}: give its length in epochs or as a fraction, not both")
        if self.epochs is not None and (isinstance(self.epochs, bool) or self.epochs < 0):
            raise ConfigError(f"phase {self.name!r}: epochs must be a whole number >= 0, got {self.epochs!r}")
        if self.fraction is not None and not 0.0 <= self.fraction <= 1.0:
            raise ConfigError(f"phase {self.name!r}: fraction must be in [0, 1], got {self.fraction!r}")

    def length(self, total_epochs: int) -> int | None:
        """Whole epochs of a ``total_epochs`` run; fractions round like Python's ``round``."""
        if self.epochs is not None:
            return self.epochs
        return None if self.fraction is None else round(self.fraction * total_epochs)


def phase_starts(phases: Sequence[Phase], total_epochs: int) -> list[int]:
    """The first epoch of each phase; a phase of length 0 starts where the next one does."""
    starts, start = [], 0
    for index, phase in enumerate(phases):
        starts.append(start)
        length = phase.length(total_epochs)
        if length is None and index < len(phases) - 1:
            raise ConfigError(f"phase {phase.name!r} has no length but is not the last; give it epochs or a fraction")
        start += length or 0
    if start > total_epochs:
        names = " → ".join(phase.name for phase in phases)
        raise ConfigError(f"phases {names} need {start} epochs, the run has {total_epochs}; raise train.epochs "
                          "or shorten the phases")
    return starts


def phase_at(phases: Sequence[Phase], epoch: int, total_epochs: int) -> Phase:
    """The phase that 0-based ``epoch`` belongs to (epochs past every phase stay in the last)."""
    starts = phase_starts(phases, total_epochs)
    return next(phase for phase, start in zip(reversed(phases), reversed(starts)) if start <= epoch)


@dataclass(eq=False)
class Auxiliary:
    """A module a hook trains or consults beside the model: teacher, peer, discriminator, …

    The trainer owns it like the model: moves it to the device, gives its parameters a group
    with ``lr`` and ``weight_decay`` (None: the run's), applies the schedule and gradient
    clipping, checkpoints it for an exact resume and wraps it in DDP. ``step_order`` < 0 puts it
    in an optimizer of its own stepped before the model's (discriminators before networks),
    > 0 after; that optimizer may be of another ``optimizer`` kind than the run's (``sgd`` or
    ``adamw``; None: the run's), e.g. Adam for a discriminator. A frozen one (``trainable``
    False) is only placed; its hook rebuilds it on resume.
    Call the auxiliary itself (``aux(x)``), not ``aux.module``, so DDP sees the forward.
    """

    module: nn.Module
    lr: float | None = None
    weight_decay: float | None = None
    step_order: int = 0
    trainable: bool = True
    optimizer: OptimizerName | None = None
    runner: nn.Module | None = field(default=None, init=False, repr=False)  #: set by the trainer (DDP)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return (self.module if self.runner is None else self.runner)(*args, **kwargs)


class TrainHook:
    """Base class of training-loop plugins; the defaults change nothing."""

    name: ClassVar[str] = ""  #: prefix of its loss terms, auxiliaries and phases in logs and checkpoints

    @property
    def label(self) -> str:
        return self.name or type(self).__name__

    # -- declarations

    def phases(self) -> Sequence[Phase]:
        """The hook's named phases in order; none means one phase for the whole run."""
        return ()

    def auxiliaries(self) -> Mapping[str, Auxiliary]:
        """Modules the trainer must own beside the model, by name (asked once, after wrapping)."""
        return {}

    def feature_taps(self) -> Sequence[str]:
        """Names of model stages whose outputs this hook reads with ``trainer.feature(name)``."""
        return ()

    def output_keys(self) -> frozenset[str]:
        """Keys its :meth:`forward` returns; ``"logits"`` means it runs the student's forward."""
        return frozenset()

    # -- calls

    def setup(self, trainer: Trainer) -> None:
        """Called once the model, data and optimizer exist, before the first epoch."""

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """Return the module to train (e.g. with masks or fake-quant inserted)."""
        return model

    def on_phase_start(self, trainer: Trainer, phase: Phase) -> None:
        """A phase begins, or a resumed run enters it (so it must not redo restored work)."""

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        """Per-epoch switches (e.g. freeze observers in the last epochs)."""

    def forward(self, trainer: Trainer, model: nn.Module, x: Tensor) -> dict[str, Tensor] | None:
        """Training-forward outputs merged into the step's dict (keys from :meth:`output_keys`).

        The hook that declares ``"logits"`` runs first and replaces the model's forward; the others
        add keys (teacher logits, peer logits, …).
        """
        return None

    def extra_losses(self, trainer: Trainer, outputs: dict[str, Tensor], targets: Tensor) -> dict[str, Tensor]:
        """Named loss terms added to the task loss (logged per epoch as ``<hook>.<term>``)."""
        return {}

    def after_backward(self, trainer: Trainer) -> None:
        """Gradient surgery before the optimizer step (scaling, routing, masking)."""

    def after_step(self, trainer: Trainer) -> None:
        """After each optimizer step (e.g. re-apply or refresh pruning masks)."""

    def eval_forward(self, trainer: Trainer, model: nn.Module, x: Tensor) -> Tensor | None:
        """Logits of the deploy path in evaluation; None to use the model as is."""
        return None

    def finalize(self, model: nn.Module) -> nn.Module:
        """Materialize the deployable module (apply masks, fold, drop auxiliaries)."""
        return model

    def state_dict(self) -> dict[str, Any]:
        """Hook state saved in checkpoints so a resumed run continues exactly."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
