"""The dense path over a pruned model's weights: PQK's self-teacher and DCIL's second network.

PQK (methods.md §4) and DCIL (§8) run one network twice on the same weight tensors. The pruned
path is the model itself on ``w * m`` (:class:`~asc.compress.prune.MagnitudePruning` in keep-values
mode), so its losses reach only kept weights. The dense path is built here, once for both:

* a masked weight enters as ``where(m, w.detach(), w)``: its value is the full ``w``, its gradient
  ``g * (1 - m)``, so only the pruned entries learn from this path;
* every other tensor of the model (unmasked layers, biases, the pruned path's norms and head)
  enters detached: they belong to the pruned path;
* the path owns copies of some modules (the batch norms; DCIL also the classifier) whose
  parameters and buffers replace the model's in the call, so they train only from this path and
  their running statistics move only with its batches.

:class:`DensePath` is an ``nn.Module`` whose parameters are exactly the owned copies and whose
``forward`` is the dense network. A method registers it as an
:class:`~asc.train.hooks.Auxiliary` and calls the auxiliary, so under DDP the trainer's wrapper
sees the forward and all-reduces the owned modules' gradients; the pruned weights' gradients
accumulate on the model's own parameters in the same backward and are reduced by the model's
wrapper. The model is held outside the module tree, so its weights are neither optimized,
checkpointed nor wrapped twice.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from asc.compress.prune import MASK, MagnitudePruning

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def batch_norm_names(model: nn.Module) -> list[str]:
    """Names of the batch norms of ``model`` (a sub-spectral norm's inner BN included)."""
    return [name for name, module in model.named_modules() if isinstance(module, _BATCH_NORMS)]


def routed_weights(model: nn.Module, pruning: MagnitudePruning) -> dict[str, Tensor]:
    """``{name: tensor}`` of ``model`` for the dense path: masked weights reach only pruned entries.

    A weight of a layer ``pruning`` masks becomes ``where(m, w.detach(), w)`` (full value, gradient
    ``g * (1 - m)``); every other parameter is detached. Masks are read live, so a refresh applies
    at the next call.
    """
    masks = {id(module.weight): module.get_buffer(MASK) for module in pruning.layers.values()}
    tensors: dict[str, Tensor] = {}
    for name, weight in model.named_parameters():
        mask = masks.get(id(weight))
        tensors[name] = weight.detach() if mask is None else torch.where(mask, weight.detach(), weight)
    return tensors


class DensePath(nn.Module):
    """The dense network over ``model``'s weights with its own copies of the modules ``names``.

    The copies start as the model's modules; :meth:`restart` copies them again (PQK's teacher
    starts from the student's norms when its phase begins).
    """

    def __init__(self, model: nn.Module, pruning: MagnitudePruning, names: Sequence[str]) -> None:
        super().__init__()
        modules = dict(model.named_modules())
        self.names = list(names)
        self.owned = nn.ModuleList(copy.deepcopy(modules[name]) for name in self.names)
        # A tuple keeps the model out of this module's tree: its weights are the trainer's model's.
        self._model = (model,)
        self._pruning = pruning

    @property
    def model(self) -> nn.Module:
        return self._model[0]

    def own(self, name: str) -> nn.Module:
        """This path's copy of the model's module ``name``."""
        return self.owned[self.names.index(name)]

    def forward(self, x: Tensor) -> Tensor:
        tensors = routed_weights(self.model, self._pruning)
        for name, module in zip(self.names, self.owned, strict=True):
            tensors.update({f"{name}.{key}": value for key, value in module.state_dict(keep_vars=True).items()})
        self.model.train()  # a training path: batch statistics, even if the model was last evaluated
        return torch.func.functional_call(self.model, tensors, (x,))

    @torch.no_grad()
    def restart(self) -> None:
        """Copy the model's current modules into this path's own ones."""
        modules = dict(self.model.named_modules())
        for name, module in zip(self.names, self.owned, strict=True):
            module.load_state_dict(modules[name].state_dict())
