"""Hook points of the training loop.

Compression methods (pruning, quantization-aware training, distillation, …) are plugins that
override some of these methods; the loop itself never knows which method is active. Every method
has a neutral default, so a hook implements only what it needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from asc.train.loop import Trainer


class TrainHook:
    """Base class of training-loop plugins; the defaults change nothing."""

    def setup(self, trainer: Trainer) -> None:
        """Called once the model, data and optimizer exist, before the first epoch."""

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """Return the module to train (e.g. with masks or fake-quant inserted)."""
        return model

    def extra_optimizers(self, model: nn.Module) -> list[torch.optim.Optimizer]:
        """Optimizers for parameters the main optimizer must not touch."""
        return []

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        """Phase switches (e.g. freeze observers, start distillation)."""

    def forward(self, trainer: Trainer, model: nn.Module, x: Tensor) -> dict[str, Tensor] | None:
        """Run the training forward; return ``{"logits": …, …}`` or None to use the model as is."""
        return None

    def extra_losses(self, trainer: Trainer, outputs: dict[str, Tensor], targets: Tensor) -> dict[str, Tensor]:
        """Named loss terms added to the task loss."""
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
