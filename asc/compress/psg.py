"""PSG: position-based scaled gradient (Kim et al., NeurIPS 2020; methods.md §6).

Training stays in float, but every conv/linear weight's gradient is multiplied by
``λ · |w − Q(w)|``, its distance to the nearest point of a ``bits``-bit symmetric grid. Weights
near a grid point barely move, so they cluster on the grid and the trained float model loses
little when it is quantized after training (``asc export --int8``); no fake-quant is inserted.

``Q(w) = Δ · round(clip(w / Δ, −(2^(b−1) − 1), 2^(b−1) − 1))`` with ``Δ = max(|w_min|, |w_max|) /
(2^(b−1) − 1)``; the per-tensor range ``w_min = min(0, min w)``, ``w_max = max(0, max w)`` is an
exponential moving average (momentum 0.1, the first step initializes it), as in the official code.
The scaling is applied after backward and before the optimizer step, so weight decay (added by
the optimizer) is not scaled. The official recipe starts PSG after the first learning-rate decay:
phase ``float`` (``start`` of the run) trains unchanged, phase ``psg`` scales.

Deploy: the finalized module is the float model (fp32 export). With ``bits`` <= 8, finalize also
writes PSG's own grid (``quant_grid.json``, :mod:`asc.compress.grid`: Δ of every layer from the
final moving-average range, the same for all output channels), so the int8 export
(:mod:`asc.export.grid`) stores exactly ``Q(w) / Δ`` instead of re-calibrating the weights; the
layer inputs, which PSG does not train for, are calibrated there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from asc.compress.base import Job, Method, StageContext, parse_options, register
from asc.compress.grid import LayerGrid, QuantGrid, per_channel
from asc.compress.prune import weight_layers
from asc.errors import ConfigError
from asc.train.hooks import Phase

if TYPE_CHECKING:
    from asc.train.loop import Trainer

FLOAT, SCALED = "float", "psg"


@dataclass
class PSGOptions:
    bits: int = 8  #: bit width of the grid the weights are pulled to
    scale: float = 150.0  #: λ_s, the gradient scale per unit of distance to the grid
    momentum: float = 0.1  #: weight of the current range in the moving average
    start: float = 0.0  #: fraction of the epochs trained unchanged before the scaling starts

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 16:
            raise ConfigError(f"psg.bits must be a whole number in [2, 16], got {self.bits!r}")
        if self.scale <= 0:
            raise ConfigError(f"psg.scale must be > 0, got {self.scale!r}")
        if not 0.0 < self.momentum <= 1.0:
            raise ConfigError(f"psg.momentum must be in (0, 1], got {self.momentum!r}")
        if not 0.0 <= self.start < 1.0:
            raise ConfigError(f"psg.start must be in [0, 1) (a fraction of the epochs), got {self.start!r}")


def grid_step(w_min: Tensor, w_max: Tensor, bits: int) -> Tensor:
    """Δ of the restricted symmetric ``bits``-bit grid spanning ``[w_min, w_max]``."""
    return torch.maximum(w_min.abs(), w_max.abs()).clamp_min(torch.finfo(w_min.dtype).tiny) / (2 ** (bits - 1) - 1)


def grid_point(weight: Tensor, w_min: Tensor, w_max: Tensor, bits: int) -> Tensor:
    """``Q(w) = Δ · round(clip(w / Δ, −L, L))``, the nearest grid point."""
    levels, step = 2 ** (bits - 1) - 1, grid_step(w_min, w_max, bits)
    return step * torch.round(torch.clamp(weight / step, -levels, levels))


def grid_distance(weight: Tensor, w_min: Tensor, w_max: Tensor, bits: int) -> Tensor:
    """``|w − Q(w)|`` on the restricted symmetric ``bits``-bit grid spanning ``[w_min, w_max]``."""
    return (weight - grid_point(weight, w_min, w_max, bits)).abs()


@register
class PSG(Method):
    """Scales every conv/linear weight gradient by its distance to the quantization grid."""

    name = "psg"
    jobs = frozenset({Job.QUANTIZATION})

    def __init__(self, options: PSGOptions) -> None:
        self.options = options
        self.layers: dict[str, nn.Module] = {}
        self.ranges: dict[str, Tensor] = {}  #: per layer: (w_min, w_max) moving averages
        self.scaling = False
        self.run_dir: Path | None = None

    @classmethod
    def build(cls, options: Mapping[str, Any], context: StageContext) -> PSG:
        return cls(parse_options(PSGOptions, options, cls.name))

    def phases(self) -> tuple[Phase, Phase]:
        return Phase(FLOAT, fraction=self.options.start), Phase(SCALED)

    def wrap_model(self, model: nn.Module) -> nn.Module:
        self.layers = dict(weight_layers(model))
        if not self.layers:
            raise ConfigError(f"psg: {type(model).__name__} has no conv or linear weights to scale")
        return model

    def setup(self, trainer: Trainer) -> None:
        self.run_dir = trainer.run_dir

    def on_phase_start(self, trainer: Trainer, phase: Phase) -> None:
        self.scaling = phase.name == SCALED

    @torch.no_grad()
    def _track(self, name: str, weight: Tensor) -> Tensor:
        current = torch.stack([weight.min().clamp(max=0.0), weight.max().clamp(min=0.0)])
        previous = self.ranges.get(name)
        self.ranges[name] = current if previous is None else torch.lerp(previous, current, self.options.momentum)
        return self.ranges[name]

    @torch.no_grad()
    def after_backward(self, trainer: Trainer) -> None:
        if not self.scaling:
            return
        for name, module in self.layers.items():
            weight = module.weight
            w_min, w_max = self._track(name, weight.detach())
            if weight.grad is not None:
                weight.grad.mul_(self.options.scale * grid_distance(weight.detach(), w_min, w_max, self.options.bits))

    def grid(self) -> QuantGrid:
        """Every layer's Δ, from the moving-average range (the current weights' range if never tracked)."""
        layers = {}
        for name, module in self.layers.items():
            weight = module.weight.detach()
            w_min, w_max = self.ranges.get(name, torch.stack([weight.min().clamp(max=0.0),
                                                              weight.max().clamp(min=0.0)]))
            layers[name] = LayerGrid(self.options.bits, per_channel(grid_step(w_min, w_max, self.options.bits),
                                                                    weight.shape[0]))
        return QuantGrid(self.name, layers)

    def finalize(self, model: nn.Module) -> nn.Module:
        """The float model as trained; PSG's grid goes beside it for the int8 export (bits <= 8)."""
        if self.run_dir is not None and self.options.bits <= 8:
            self.grid().save(self.run_dir)
        return model

    def state_dict(self) -> dict[str, Any]:
        return {"ranges": {name: value.clone() for name, value in self.ranges.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ranges = {name: value.clone() for name, value in state["ranges"].items()}

    def settings(self) -> dict[str, Any]:
        return asdict(self.options)
