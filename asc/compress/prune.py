"""Pruning building blocks: unstructured magnitude masks and structured channel removal.

Two kinds of pruning with different pay-offs (reference/compression.md §6):

* **Unstructured** (:class:`MagnitudePruning`): zeroes single weights on a cubic schedule. It
  shrinks non-zero counts and zipped size, never the ONNX file or its latency.
* **Structured** (:func:`prune_channels`): removes whole channels through Torch-Pruning's
  dependency graph, so every coupled tensor (BN, depthwise groups, residual partners, the next
  conv's inputs) gets physically smaller; the pruned shape is recorded with :func:`~asc.models.resize.channel_spec`
  and recreated from the original class with :func:`~asc.models.resize.rebuild_pruned`, so checkpoints stay plain
  state dicts.

Masks are boolean buffers named ``weight_mask`` on the pruned modules rather than
``torch.nn.utils.parametrize`` or ``torch.nn.utils.prune`` reparametrizations: the forward stays an
ordinary module (no per-access recomputation, no ``weight_orig``/``parametrizations.*`` key
renaming, no deep-copy failure of prune's derived ``weight`` attribute), other hooks such as
fake-quant see the real ``weight`` parameter, and the masks still travel in ``state_dict``.
Removing them (:func:`materialize_masks`) leaves a plain module that exports as is.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch_pruning as tp
from torch import Tensor, nn

from asc.errors import ConfigError
from asc.models.norms import SubSpectralNorm
from asc.train.hooks import TrainHook

if TYPE_CHECKING:
    from asc.train.loop import Trainer

MASK = "weight_mask"
"""Name of the boolean buffer (True = keep) that a pruned module carries beside its weight."""

Scope = Literal["global", "layer"]

_WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


# ---------------------------------------------------------------------------------------------
# Which weights are prunable


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Conv and linear modules in registration order (for the models here, also execution order)."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, _WEIGHT_LAYERS)]


def end_layers(model: nn.Module) -> tuple[str, str]:
    """Names of the stem (first conv/linear) and the classifier (last one).

    Both are kept whole by default: the stem sees a single input channel, so its few weights
    carry everything, and the classifier's outputs are the classes.
    """
    layers = weight_layers(model)
    if not layers:
        raise ConfigError(f"{type(model).__name__} has no conv or linear layers to prune; prune another model")
    return layers[0][0], layers[-1][0]


def _is_depthwise(module: nn.Module) -> bool:
    is_conv = isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    return is_conv and 1 < module.groups == module.in_channels


def _pattern(regex: str | None, role: str) -> re.Pattern[str] | None:
    if regex is None:
        return None
    try:
        return re.compile(regex)
    except re.error as error:
        raise ConfigError(f"pruning {role} pattern {regex!r} is not a valid regular expression ({error}); "
                          "fix the pattern") from None


@dataclass(frozen=True)
class LayerSelection:
    """Which conv/linear weights a pruning method may touch.

    ``include``/``exclude`` are regular expressions searched in module names (``include`` keeps
    only matches, ``exclude`` then drops matches). ``keep_ends`` leaves the stem and the classifier
    dense (see :func:`end_layers`); ``depthwise`` allows depthwise convs.
    """

    include: str | None = None
    exclude: str | None = None
    depthwise: bool = True
    keep_ends: bool = True

    def select(self, model: nn.Module) -> dict[str, nn.Module]:
        include, exclude = _pattern(self.include, "include"), _pattern(self.exclude, "exclude")
        ends = end_layers(model) if self.keep_ends else ()
        chosen = {
            name: module for name, module in weight_layers(model)
            if name not in ends
            and (self.depthwise or not _is_depthwise(module))
            and (include is None or include.search(name))
            and (exclude is None or not exclude.search(name))
        }
        if not chosen:
            raise ConfigError(f"pruning selection {self} matches no layer of {type(model).__name__}; "
                              "loosen include/exclude or allow depthwise/end layers")
        return chosen


# ---------------------------------------------------------------------------------------------
# Schedule and ranking


def cubic_sparsity(step: int, start_step: int, end_step: int, final_sparsity: float,
                   initial_sparsity: float = 0.0) -> float:
    """Gradual-pruning target ``s_f + (s_i - s_f) * (1 - t)^3`` with ``t`` the clamped progress.

    Prunes fast while many redundant weights remain and slowly near the target, so the network
    has time to recover (Zhu & Gupta 2017; the schedule of DCIL/PQK, methods.md §4, §8).
    """
    if step >= end_step:
        progress = 1.0
    elif step <= start_step:
        progress = 0.0
    else:
        progress = (step - start_step) / (end_step - start_step)
    return final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - progress) ** 3


@dataclass(frozen=True)
class PruningSchedule:
    """Cubic sparsity ramp from ``start_step`` to ``end_step``; masks refresh every ``every`` steps.

    Refreshes happen at ``start_step + k * every`` and at ``end_step`` (so the final sparsity is
    reached exactly); after ``end_step`` the masks are frozen and training only heals the network.
    Steps count optimizer steps (``Trainer.step``).
    """

    final_sparsity: float
    end_step: int
    start_step: int = 0
    initial_sparsity: float = 0.0
    every: int = 16

    def __post_init__(self) -> None:
        if not 0.0 <= self.initial_sparsity <= self.final_sparsity < 1.0:
            raise ConfigError(f"pruning sparsities must satisfy 0 <= initial ({self.initial_sparsity}) <= final "
                              f"({self.final_sparsity}) < 1; choose fractions of weights to remove")
        if not 0 <= self.start_step <= self.end_step:
            raise ConfigError(f"pruning steps must satisfy 0 <= start_step ({self.start_step}) <= end_step "
                              f"({self.end_step}); fix the schedule")
        if self.every < 1:
            raise ConfigError(f"pruning refresh interval must be at least 1 step, got every={self.every}")

    def sparsity(self, step: int) -> float:
        return cubic_sparsity(step, self.start_step, self.end_step, self.final_sparsity, self.initial_sparsity)

    def refreshes(self, step: int) -> bool:
        """Whether masks are recomputed after optimizer step ``step``."""
        in_ramp = self.start_step <= step <= self.end_step
        return in_ramp and ((step - self.start_step) % self.every == 0 or step == self.end_step)


def _keep_largest(scores: Tensor, n_pruned: int) -> Tensor:
    """Keep-mask removing exactly ``n_pruned`` entries, smallest first, ties by position (stable)."""
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    keep[torch.argsort(scores.flatten(), stable=True)[:n_pruned]] = False
    return keep.view_as(scores)


def magnitude_masks(weights: Mapping[str, Tensor], sparsity: float, scope: Scope = "global") -> dict[str, Tensor]:
    """Boolean keep-masks that remove ``round(sparsity * n)`` weights of smallest ``|w|``.

    ``global`` ranks all tensors together (one threshold; layers with small weights lose more),
    ``layer`` ranks each tensor alone (every layer gets the same sparsity). Ranking by ``w^2``
    (DCIL's "L2") gives the same order, so it is not a separate option. Exactly ``n`` weights are
    removed even with ties, so the sparsity is right to one weight.
    """
    if scope == "layer":
        return {name: _keep_largest(w.detach().abs(), round(sparsity * w.numel())) for name, w in weights.items()}
    if scope != "global":
        raise ConfigError(f"unknown pruning scope {scope!r}; valid: global, layer")
    flat = torch.cat([w.detach().abs().flatten() for w in weights.values()])
    keep = _keep_largest(flat, round(sparsity * flat.numel()))
    pieces = keep.split([w.numel() for w in weights.values()])
    return {name: piece.view_as(w) for (name, w), piece in zip(weights.items(), pieces, strict=True)}


# ---------------------------------------------------------------------------------------------
# Masks on a model


def _has_mask(module: nn.Module) -> bool:
    return MASK in dict(module.named_buffers(recurse=False))


def masked_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules carrying a pruning mask, by name."""
    return [(name, module) for name, module in model.named_modules() if _has_mask(module)]


@torch.no_grad()
def materialize_masks(model: nn.Module) -> nn.Module:
    """Multiply every masked weight by its mask and delete the mask buffers (in place).

    What is left is an ordinary module (plain ``weight`` parameters, exact zeros) that exports
    without knowing it was pruned.
    """
    for _, module in masked_modules(model):
        module.weight.mul_(module.get_buffer(MASK))
        delattr(module, MASK)
    return model


def sparsity_report(model: nn.Module, names: Sequence[str] | None = None) -> dict[str, Any]:
    """Zero fraction of each conv/linear weight (mask applied if present) and over all of them.

    ``names`` restricts the report (e.g. to the pruned layers, so the global figure is comparable
    with the target sparsity). Returns ``{"layers": {name: {"zeros", "total", "sparsity"}},
    "zeros", "total", "sparsity"}``.
    """
    wanted = None if names is None else set(names)
    layers: dict[str, dict[str, float | int]] = {}
    with torch.no_grad():
        for name, module in weight_layers(model):
            if wanted is not None and name not in wanted:
                continue
            weight = module.weight
            if _has_mask(module):
                weight = weight * module.get_buffer(MASK)
            zeros, total = int((weight == 0).sum()), weight.numel()
            layers[name] = {"zeros": zeros, "total": total, "sparsity": zeros / total}
    if wanted is not None and wanted - layers.keys():
        raise ConfigError(f"sparsity report: no conv/linear layer named {sorted(wanted - layers.keys())}; "
                          "use names from model.named_modules()")
    zeros = sum(int(entry["zeros"]) for entry in layers.values())
    total = sum(int(entry["total"]) for entry in layers.values())
    return {"layers": layers, "zeros": zeros, "total": total, "sparsity": zeros / total if total else 0.0}


class MagnitudePruning(TrainHook):
    """Gradual unstructured magnitude pruning as a training-loop plugin.

    ``wrap_model`` registers all-ones masks on the selected layers; after every optimizer step the
    masks are refreshed when the schedule says so. This hook is the only owner of the masks; other
    methods read them through :attr:`masks` (e.g. PQK routes gradients with them).

    Two ways to enforce a mask:

    * default: pruned weights are set to exactly zero after each step (and their gradients are
      zeroed before it, so gradient clipping ignores them). Momentum and weight decay cannot
      revive them; a zero stays the smallest magnitude, so pruned weights never come back.
    * ``keep_pruned_values=True``: stored weights are left alone and the forward (training and
      evaluation) runs on ``weight * mask`` (:meth:`masked_parameters`), so pruned weights get no
      gradient but keep their values (weight decay still shrinks them) and may re-enter at the
      next refresh. This is what PQK needs to add them back as a teacher.

    ``schedule`` may be left out when a method sets it in ``setup`` from the run's length.
    """

    name = "prune"

    def __init__(self, schedule: PruningSchedule | None = None, *, selection: LayerSelection = LayerSelection(),
                 scope: Scope = "global", keep_pruned_values: bool = False) -> None:
        if scope not in ("global", "layer"):
            raise ConfigError(f"unknown pruning scope {scope!r}; valid: global, layer")
        self.schedule = schedule
        self.selection = selection
        self.scope = scope
        self.keep_pruned_values = keep_pruned_values
        self.layers: dict[str, nn.Module] = {}

    # -- masks

    @property
    def masks(self) -> dict[str, Tensor]:
        """``{"<module>.weight": bool mask}``, the live buffers (read them, do not write them)."""
        return {f"{name}.weight": module.get_buffer(MASK) for name, module in self.layers.items()}

    def masked_parameters(self, model: nn.Module) -> dict[str, Tensor]:
        """``{name in model: weight * mask}`` for :func:`torch.func.functional_call` on ``model``.

        Runs the pruned network without touching the stored weights, so the pruned values survive
        (PQK's teacher) while gradients reach only kept weights. Weights are matched by identity,
        so ``model`` may be any wrapper sharing the pruned parameters (e.g. a QAT graph, which
        drops the unused mask buffers and renames modules).
        """
        layers = {id(module.weight): module for module in self.layers.values()}
        return {name: weight * layers[id(weight)].get_buffer(MASK)
                for name, weight in model.named_parameters() if id(weight) in layers}

    def _schedule(self) -> PruningSchedule:
        if self.schedule is None:
            raise ConfigError("magnitude pruning has no schedule; pass one or set it before setup")
        return self.schedule

    @torch.no_grad()
    def refresh(self, step: int) -> None:
        """Recompute the masks for the target sparsity of ``step``, ranking the stored weights."""
        weights = {name: module.weight for name, module in self.layers.items()}
        for name, mask in magnitude_masks(weights, self._schedule().sparsity(step), self.scope).items():
            self.layers[name].get_buffer(MASK).copy_(mask)

    @torch.no_grad()
    def apply(self) -> None:
        """Set the pruned weights to zero (default mode)."""
        for module in self.layers.values():
            module.weight.mul_(module.get_buffer(MASK))

    def update(self, step: int) -> None:
        """What happens after optimizer step ``step``: refresh on schedule, then enforce the masks."""
        if self._schedule().refreshes(step):
            self.refresh(step)
        if not self.keep_pruned_values:
            self.apply()

    # -- hook points

    def wrap_model(self, model: nn.Module) -> nn.Module:
        layers = self.selection.select(model)
        owned = [name for name, module in layers.items() if _has_mask(module)]
        if owned:
            raise ConfigError(f"layers {owned} already carry pruning masks; use one pruning method per run")
        for module in layers.values():
            module.register_buffer(MASK, torch.ones_like(module.weight, dtype=torch.bool))
        self.layers = layers
        return model

    def setup(self, trainer: Trainer) -> None:
        self.update(trainer.step)

    def after_backward(self, trainer: Trainer) -> None:
        if self.keep_pruned_values:
            return
        for module in self.layers.values():
            if module.weight.grad is not None:
                module.weight.grad.mul_(module.get_buffer(MASK))

    def after_step(self, trainer: Trainer) -> None:
        self.update(trainer.step)

    def output_keys(self) -> frozenset[str]:
        return frozenset({"logits"}) if self.keep_pruned_values else frozenset()

    def forward(self, trainer: Trainer, model: nn.Module, x: Tensor) -> dict[str, Tensor] | None:
        if not self.keep_pruned_values:
            return None
        return {"logits": torch.func.functional_call(model, self.masked_parameters(model), (x,))}

    def eval_forward(self, trainer: Trainer, model: nn.Module, x: Tensor) -> Tensor | None:
        if not self.keep_pruned_values:
            return None
        return torch.func.functional_call(model, self.masked_parameters(model), (x,))

    def finalize(self, model: nn.Module) -> nn.Module:
        """A copy with the masks multiplied in and no mask buffers (the training model is untouched).

        ``model`` may be a wrapper of the pruned modules (e.g. a QAT graph without the mask
        buffers): the masked values are found by weight identity before copying.
        """
        masked = {name: value.detach() for name, value in self.masked_parameters(model).items()}
        final = copy.deepcopy(model)
        with torch.no_grad():
            for name, value in masked.items():
                final.get_parameter(name).copy_(value)
        return materialize_masks(final)

    def _settings(self) -> dict[str, Any]:
        return {"schedule": asdict(self._schedule()), "scope": self.scope, "layers": sorted(self.layers),
                "keep_pruned_values": self.keep_pruned_values}

    def state_dict(self) -> dict[str, Any]:
        # The masks travel here as well as in the model's state dict: a wrapper such as the QAT graph
        # drops the unused mask buffers, so the model's state alone would resume with all-ones masks.
        # The settings that produced them make a resume with different ones fail instead of drifting.
        return {**self._settings(), "masks": {name: mask.clone() for name, mask in self.masks.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self._settings()
        changed = sorted(key for key in mine if state.get(key) != mine[key])
        if changed:
            stored = {key: state.get(key) for key in changed}
            raise ConfigError(f"magnitude pruning: the checkpoint was pruned with different {', '.join(changed)} "
                              f"({stored}); resume with the run's own settings")
        with torch.no_grad():
            for name, module in self.layers.items():
                module.get_buffer(MASK).copy_(state["masks"][f"{name}.weight"])


# ---------------------------------------------------------------------------------------------
# Structured channel pruning


class _SubSpectralNormPruner(tp.pruner.BasePruningFunc):
    """Torch-Pruning handler for SubSpectralNorm: channel ``c`` owns BN channels ``c*S .. c*S+S-1``.

    Without it Torch-Pruning (1.6) infers that coupling from the reshape inside the norm with a
    heuristic (a flatten index mapping from channel counts it infers around the reshape). That
    heuristic happened to be right for every BC-ResNet shape tried, but nothing guarantees it;
    registering the norm as one layer makes the mapping explicit. Cost: the norm's per-band
    gammas do not enter the group importance (the convs and the time BN of the group still do).
    """

    TARGET_MODULES = (SubSpectralNorm,)

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        bands = layer.sub_bands
        tp.prune_batchnorm_out_channels(layer.bn, [c * bands + b for c in idxs for b in range(bands)])
        return layer

    prune_in_channels = prune_out_channels  # a norm: inputs and outputs are the same channels

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.bn.num_features // layer.sub_bands

    get_in_channels = get_out_channels


def prune_channels(model: nn.Module, example_input: Tensor, ratio: float, *, round_to: int | None = 8,
                   ignored_layers: Sequence[str] | None = None, global_pruning: bool = False) -> nn.Module:
    """A copy of ``model`` with ``ratio`` of the channels of every prunable group removed.

    Channels are ranked by group L2 magnitude (Torch-Pruning ``GroupMagnitudeImportance``) over
    all coupled tensors. ``ignored_layers`` (module names; default: the stem and the classifier,
    :func:`end_layers`) keep their output channels. ``round_to`` keeps channel counts multiples of
    4 or 8 for SIMD kernels; ``global_pruning`` ranks groups against each other instead of
    pruning each by ``ratio``. The copy is traced in eval mode, so BN statistics are untouched;
    the result needs fine-tuning (and a :func:`~asc.models.resize.channel_spec` to be rebuilt later).
    """
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(f"channel pruning ratio must be in [0, 1), got {ratio}; choose the fraction to remove")
    if masked_modules(model):
        raise ConfigError("the model still carries unstructured pruning masks; materialize_masks() it before "
                          "removing channels")
    pruned = copy.deepcopy(model)
    modules = dict(pruned.named_modules())
    names = list(end_layers(pruned)) if ignored_layers is None else list(ignored_layers)
    unknown = [name for name in names if name not in modules]
    if unknown:
        raise ConfigError(f"ignored_layers {unknown} are not modules of {type(model).__name__}; "
                          "use names from model.named_modules()")
    was_training = pruned.training
    pruned.eval()
    with torch.enable_grad():  # the dependency graph is traced through autograd
        pruner = tp.pruner.BasePruner(
            pruned, example_input, importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=ratio, round_to=round_to, global_pruning=global_pruning,
            ignored_layers=[modules[name] for name in names],
            customized_pruners={SubSpectralNorm: _SubSpectralNormPruner()},
        )
        pruner.step()
    return pruned.train(was_training)

