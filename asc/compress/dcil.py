"""DCIL: dynamic collective intelligence learning (arXiv 2109.04660; methods.md §8).

Two networks share every weight tensor and differ in which entries they use and train:

* the **pruned path** is the model on ``W * m`` (:class:`~asc.compress.methods.PruneMethod` in
  keep-values mode): its losses reach only the kept weights, the model's own norms ("bn_part")
  and the model's classifier ("fc_part"). It is what evaluation runs and what ships;
* the **dense path** is the :class:`~asc.compress.dense_path.DensePath` that PQK's teacher is too,
  with its own batch norms ("bn_full") and its own copy of the classifier ("fc_full"): it runs the
  full ``W`` and its losses reach only the pruned weights (``g * (1 - m)``), so pruned weights keep
  learning and may re-enter at the next mask refresh.

Loss per batch, both paths on the same input: ``CE(pruned)`` (the loop's task loss) ``+ CE(dense)``
(``dcil.dense``); after the ``kd-warmup`` phase, in ``mutual-distil``, also ``T² KL`` both ways
with the teacher side detached (``dcil.kd_pruned``: dense teaches pruned; ``dcil.kd_dense``:
pruned teaches dense). Masks: one global threshold over the pruned layers on ``w²`` (the same
order as ``|w|``), the cubic sparsity ramp to ``target`` of the run, refreshed every ``every``
steps, then frozen. Every conv is pruned (the stem too, unless ``keep_stem``); the classifier and
the norms never are.

The dense path's norms and classifier are an auxiliary module: the trainer optimizes, schedules,
clips, checkpoints and DDP-wraps them. Finalize keeps the pruned path only (masks multiplied in,
its norms, its classifier); the dense path is dropped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from asc.compress.base import Job, Method, StageContext, parse_options, register
from asc.compress.dense_path import DensePath, batch_norm_names
from asc.compress.kd import kd_loss
from asc.compress.methods import PruneMethod, PruneOptions
from asc.compress.prune import LayerSelection, end_layers
from asc.errors import ConfigError
from asc.train.hooks import Auxiliary, Phase

if TYPE_CHECKING:
    from asc.train.loop import Trainer

WARMUP, MUTUAL = "kd-warmup", "mutual-distil"


@dataclass
class DCILOptions:
    sparsity: float = 0.8  #: final fraction of zero weights in the pruned layers
    scope: str = "global"  #: "global": one threshold over all pruned layers (DCIL's); "layer": per layer
    target: float = 0.75  #: fraction of the steps at which the sparsity is reached; masks are frozen after it
    every: int = 16  #: refresh the masks every this many steps during the ramp
    warmup: float = 0.25  #: fraction of the epochs before mutual distillation starts (the KD warm-up)
    temperature: float = 2.0  #: of both distillation terms
    keep_stem: bool = False  #: leave the first conv dense (DCIL prunes every conv)

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"dcil.sparsity must be in [0, 1), got {self.sparsity!r}")
        if self.scope not in ("global", "layer"):
            raise ConfigError(f"dcil.scope must be global or layer, got {self.scope!r}")
        if not 0.0 <= self.target <= 1.0:
            raise ConfigError(f"dcil.target must be in [0, 1] (a fraction of the steps), got {self.target!r}")
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ConfigError(f"dcil.every must be a whole number >= 1 (steps), got {self.every!r}")
        if not 0.0 <= self.warmup <= 1.0:
            raise ConfigError(f"dcil.warmup must be in [0, 1] (a fraction of the epochs), got {self.warmup!r}")
        if self.temperature <= 0:
            raise ConfigError(f"dcil.temperature must be > 0, got {self.temperature!r}")


@register
class DCIL(Method):
    """Pruned and dense paths over shared weights with routed gradients; mutual distillation after warm-up."""

    name = "dcil"
    jobs = frozenset({Job.MASKS, Job.DISTILLATION})

    def __init__(self, options: DCILOptions) -> None:
        self.options = options
        self.pruning = PruneMethod(PruneOptions(sparsity=options.sparsity, scope=options.scope, end=options.target,
                                                every=options.every), keep_pruned_values=True)
        self.dense_path: DensePath | None = None  #: made when the model is wrapped
        self.dense: Auxiliary | None = None  #: the dense path as the trainer owns it (and DDP-wraps it)
        self.mutual = False

    @classmethod
    def build(cls, options: Mapping[str, Any], context: StageContext) -> DCIL:
        return cls(parse_options(DCILOptions, options, cls.name))

    @property
    def layers(self) -> dict[str, nn.Module]:
        """The pruned conv layers by name."""
        return self.pruning.layers

    def _dense(self) -> Auxiliary:
        if self.dense is None:
            raise ConfigError("dcil: the model was not wrapped yet; the stage wraps it before training")
        return self.dense

    def selection(self, model: nn.Module) -> LayerSelection:
        """Every conv/linear but the classifier (and the stem with ``keep_stem``)."""
        stem, classifier = end_layers(model)
        kept = [classifier, stem] if self.options.keep_stem else [classifier]
        return LayerSelection(exclude="|".join(f"^{re.escape(name)}$" for name in kept), keep_ends=False)

    # -- declarations

    def phases(self) -> tuple[Phase, Phase]:
        return Phase(WARMUP, fraction=self.options.warmup), Phase(MUTUAL)

    def auxiliaries(self) -> dict[str, Auxiliary]:
        return {"dense": self._dense()}

    def output_keys(self) -> frozenset[str]:
        return frozenset({"logits", "dense_logits"})

    # -- hook points

    def wrap_model(self, model: nn.Module) -> nn.Module:
        _, classifier = end_layers(model)
        self.pruning.selection = self.selection(model)  # known only now: the classifier's name
        self.dense_path = DensePath(model, self.pruning, [*batch_norm_names(model), classifier])
        self.dense = Auxiliary(self.dense_path)
        return self.pruning.wrap_model(model)

    def setup(self, trainer: Trainer) -> None:
        self.pruning.setup(trainer)

    def on_phase_start(self, trainer: Trainer, phase: Phase) -> None:
        self.mutual = phase.name == MUTUAL

    def forward(self, trainer: Trainer, model: nn.Module, x: Tensor) -> dict[str, Tensor]:
        outputs = self.pruning.forward(trainer, model, x)
        outputs["dense_logits"] = self._dense()(x)
        return outputs

    def extra_losses(self, trainer: Trainer, outputs: dict[str, Tensor], targets: Tensor) -> dict[str, Tensor]:
        from asc.train.loop import task_loss

        pruned, dense = outputs["logits"], outputs["dense_logits"]
        losses = {"dense": task_loss(dense, trainer.batch)}
        if self.mutual:
            losses["kd_pruned"] = kd_loss(pruned, dense, self.options.temperature)
            losses["kd_dense"] = kd_loss(dense, pruned, self.options.temperature)
        return losses

    def after_step(self, trainer: Trainer) -> None:
        self.pruning.after_step(trainer)

    def eval_forward(self, trainer: Trainer, model: nn.Module, x: Tensor) -> Tensor:
        return self.pruning.eval_forward(trainer, model, x)

    def finalize(self, model: nn.Module) -> nn.Module:
        """The pruned path: a copy with the masks multiplied in, its norms and classifier; no dense path."""
        return self.pruning.finalize(model)

    def state_dict(self) -> dict[str, Any]:
        return {"pruning": self.pruning.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pruning.load_state_dict(state["pruning"])

    def settings(self) -> dict[str, Any]:
        return asdict(self.options)
