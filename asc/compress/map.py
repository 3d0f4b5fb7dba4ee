"""MAP: magnitude attention-based dynamic pruning (arXiv 2306.05056; methods.md §7).

Every selected conv/linear weight ``W`` runs as ``W_eff = W · a · m`` with the per-layer
magnitude attention ``a = |W| / max |W|`` (a continuous function of the magnitude, treated as a
constant by autograd) and the binary keep-mask ``m``. So the attention acts in both passes: the
forward shrinks small weights smoothly, and the backward scales each weight's gradient,
``dL/dW = dL/dW_eff · a``, so important weights move more than unimportant ones.

Two phases (the first ``exploration`` of the epochs, then the rest):

* ``exploration`` — the masks are recomputed from ``|W|`` every ``every`` steps (and at the ramp's
  end and the phase's end) for the cubic sparsity ramp, which reaches ``sparsity`` after ``ramp``
  of the phase and then holds it. The mask is straight-through: pruned weights are zero in the
  forward but keep their values and the attention-scaled dense gradient, so one that grows can
  re-enter at the next refresh (the structure is dynamic);
* ``exploitation`` — the masks are frozen, pruned weights are set to zero and get no gradient;
  only the surviving weights are trained.

The stem and the classifier are left dense and without attention by default (``keep_ends``).
Masks are ``weight_mask`` buffers owned by a :class:`~asc.compress.prune.MagnitudePruning` in
keep-values mode (layer selection, magnitude ranking, the cubic schedule, checkpointing of the
masks), so MAP refuses layers that another pruning method already masks, and the stage refuses
``--method map`` beside another method that does masks. The forward runs on the effective
weights through :func:`torch.func.functional_call` (weights matched by identity, so a wrapper such
as the QAT graph works), the stored weights stay the raw ``W``.

Finalize folds the attention: each weight becomes ``W · a · m`` (exact zeros where pruned) and
the mask buffers are dropped, so the deployed module is an ordinary sparse network whose forward
equals the evaluation forward of the training model. The stage's float twin (``unwrap``) finds the
layers by name instead: a later method may unwrap to a copy (QKD folds its fake-quant into one).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from asc.compress.base import Job, Method, StageContext, parse_options, register
from asc.compress.prune import (
    MASK,
    LayerSelection,
    MagnitudePruning,
    PruningSchedule,
    materialize_masks,
)
from asc.errors import ConfigError
from asc.train.hooks import Phase, phase_starts

if TYPE_CHECKING:
    from asc.train.loop import Trainer

EXPLORATION, EXPLOITATION = "exploration", "exploitation"


@dataclass
class MAPOptions:
    sparsity: float = 0.8  #: final fraction of zero weights in the pruned layers
    exploration: float = 0.75  #: fraction of the epochs in the exploration phase (dynamic masks)
    ramp: float = 1.0  #: fraction of the exploration phase after which the cubic ramp reaches ``sparsity``
    every: int = 100  #: recompute the masks every this many steps while exploring
    scope: str = "global"  #: "global": one magnitude threshold over all layers; "layer": per layer
    include: str | None = None  #: regex of layer names to prune (default: all)
    exclude: str | None = None  #: regex of layer names to leave dense
    depthwise: bool = True  #: prune depthwise convs too
    keep_ends: bool = True  #: leave the stem and the classifier dense (and without attention)

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"map.sparsity must be in [0, 1), got {self.sparsity!r}")
        if not 0.0 <= self.exploration <= 1.0:
            raise ConfigError(f"map.exploration must be in [0, 1] (a fraction of the epochs), got {self.exploration!r}")
        if not 0.0 <= self.ramp <= 1.0:
            raise ConfigError(f"map.ramp must be in [0, 1] (a fraction of the exploration phase), got {self.ramp!r}")
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ConfigError(f"map.every must be a whole number >= 1 (steps), got {self.every!r}")
        if self.scope not in ("global", "layer"):
            raise ConfigError(f"map.scope must be global or layer, got {self.scope!r}")

    @property
    def selection(self) -> LayerSelection:
        return LayerSelection(self.include, self.exclude, self.depthwise, self.keep_ends)


def magnitude_attention(weight: Tensor) -> Tensor:
    """``|W| / max |W|`` (detached; all zeros for an all-zero tensor)."""
    magnitude = weight.detach().abs()
    return magnitude / magnitude.max().clamp_min(torch.finfo(magnitude.dtype).tiny)


def effective_weight(weight: Tensor, mask: Tensor, *, straight_through: bool) -> Tensor:
    """``W · a · m`` whose gradient is ``g · a`` (``straight_through``) or ``g · a · m``."""
    attended = weight * magnitude_attention(weight)
    masked = attended * mask
    if not straight_through:
        return masked
    return attended + (masked - attended).detach()  # value: exactly attended * mask (m is 0 or 1)


@register
class MAP(Method):
    """Magnitude attention in forward and backward; dynamic masks, then frozen masks; attention folded."""

    name = "map"
    jobs = frozenset({Job.MASKS})

    def __init__(self, options: MAPOptions) -> None:
        self.options = options
        self.pruning = MagnitudePruning(selection=options.selection,
                                        scope="global" if options.scope == "global" else "layer",
                                        keep_pruned_values=True)
        self.exploring = True
        self.exploration_end = 0  #: last optimizer step of the exploration phase
        self.ramp_end = 0  #: step at which the ramp reaches the final sparsity
        #: the refresh grid of the whole exploration phase (the ramp's schedule stops refreshing at its end)
        self.exploration_grid: PruningSchedule | None = None

    @classmethod
    def build(cls, options: Mapping[str, Any], context: StageContext) -> MAP:
        return cls(parse_options(MAPOptions, options, cls.name))

    @property
    def layers(self) -> dict[str, nn.Module]:
        return self.pruning.layers

    @property
    def masks(self) -> dict[str, Tensor]:
        """``{"<module>.weight": bool mask}``, the live buffers (read them, do not write them)."""
        return self.pruning.masks

    # -- declarations

    def phases(self) -> tuple[Phase, Phase]:
        return Phase(EXPLORATION, fraction=self.options.exploration), Phase(EXPLOITATION)

    def output_keys(self) -> frozenset[str]:
        return frozenset({"logits"})

    # -- the effective weights

    def effective_parameters(self, model: nn.Module, *, straight_through: bool) -> dict[str, Tensor]:
        """``{name in model: W · a · m}`` of the pruned layers, for ``functional_call`` on ``model``.

        Weights are matched by identity, so ``model`` may be any wrapper sharing them (DDP, QAT graph).
        """
        layers = {id(module.weight): module for module in self.layers.values()}
        return {name: effective_weight(weight, layers[id(weight)].get_buffer(MASK), straight_through=straight_through)
                for name, weight in model.named_parameters() if id(weight) in layers}

    def _folded(self, model: nn.Module) -> nn.Module:
        """A copy with ``W · a · m`` written into the weights and no mask buffers."""
        with torch.no_grad():
            values = {name: value.detach().clone()
                      for name, value in self.effective_parameters(model, straight_through=False).items()}
            final = copy.deepcopy(model)
            for name, value in values.items():
                final.get_parameter(name).copy_(value)
        return materialize_masks(final)

    # -- hook points

    def wrap_model(self, model: nn.Module) -> nn.Module:
        return self.pruning.wrap_model(model)

    def setup(self, trainer: Trainer) -> None:
        epochs = trainer.config.train.epochs
        self.exploration_end = phase_starts(self.phases(), epochs)[1] * trainer.steps_per_epoch
        self.ramp_end = round(self.options.ramp * self.exploration_end)
        self.pruning.schedule = PruningSchedule(self.options.sparsity, end_step=self.ramp_end,
                                                every=self.options.every)
        self.exploration_grid = PruningSchedule(self.options.sparsity, end_step=self.exploration_end,
                                                every=self.options.every)
        self.pruning.refresh(trainer.step)  # all ones, unless the ramp has no length (one-shot pruning)

    def refreshes(self, step: int) -> bool:
        """Whether the masks are recomputed after optimizer step ``step``.

        On the ramp's schedule (every ``every`` steps and at its end), and on the same grid after
        it until the exploration phase ends (so the structure keeps changing at the final sparsity).
        """
        return any(schedule is not None and schedule.refreshes(step)
                   for schedule in (self.pruning.schedule, self.exploration_grid))

    def on_phase_start(self, trainer: Trainer, phase: Phase) -> None:
        self.exploring = phase.name == EXPLORATION
        if not self.exploring:
            self.pruning.apply()  # frozen masks: pruned weights are zero from now on (idempotent on resume)

    def forward(self, trainer: Trainer, model: nn.Module, x: Tensor) -> dict[str, Tensor]:
        weights = self.effective_parameters(model, straight_through=self.exploring)
        return {"logits": torch.func.functional_call(model, weights, (x,))}

    def after_step(self, trainer: Trainer) -> None:
        if self.exploring and self.refreshes(trainer.step):
            self.pruning.refresh(trainer.step)
        if not self.exploring:
            self.pruning.apply()  # momentum must not move pruned weights away from zero

    def eval_forward(self, trainer: Trainer, model: nn.Module, x: Tensor) -> Tensor:
        return torch.func.functional_call(model, self.effective_parameters(model, straight_through=False), (x,))

    def finalize(self, model: nn.Module) -> nn.Module:
        """A copy with the attention and the masks folded into the weights (the training model is untouched)."""
        return self._folded(model)

    def unwrap(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` (the stage's float twin) with the deployed weights of MAP's layers.

        The twin must carry the attention, not just the plain masks the stage multiplies in. A later
        method's unwrap may hand over a copy whose weights it already transformed (QKD's holds the
        fake-quantized ``Q(W)``), so the layers are found by name and their weights recomputed from
        the training layers: ``W · a · m`` through the layer's own weight quantizer where it has one,
        the ``Q(W · a · m)`` of the finalized module (MAP's fold comes before QKD's there).
        """
        with torch.no_grad():
            twin = copy.deepcopy(model)
            for name, layer in self.layers.items():
                folded = effective_weight(layer.weight, layer.get_buffer(MASK), straight_through=False)
                quantizer = getattr(layer, "weight_quant", None)
                twin.get_submodule(name).weight.copy_(folded if quantizer is None else quantizer(folded))
        return materialize_masks(twin)

    def state_dict(self) -> dict[str, Any]:
        return {"pruning": self.pruning.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pruning.load_state_dict(state["pruning"])

    def settings(self) -> dict[str, Any]:
        return asdict(self.options)
