"""The quantization grid a method trained on, kept beside its compressed run (``quant_grid.json``).

A quantization method (QKD's learned steps, PSG's moving-average range) decides where every
weight of a conv/linear layer may sit: ``scale · k`` with whole ``k`` in ``[−(2^(b−1) − 1),
2^(b−1) − 1]``, one scale per output channel. Re-calibrating at export would throw that grid away,
so the method's ``finalize`` writes it here and :mod:`asc.export.grid` builds the int8 graph from
it. A sidecar, not buffers: ``finalized.pt2`` and ``checkpoints/float.pt`` hold the model's own
tensors only, and the float twin must load into the plain architecture.

``quant_grid.json``::

    {"format": 1, "method": "qkd",
     "layers": {"<module name in the float twin>": {
         "bits": 8,                        # weight bit width (restricted symmetric range)
         "weight_scale": [s_0, s_1, ...],  # one per output channel (dim 0 of the weight)
         "input": {"scale": s, "signed": false, "bits": 8, "zero_point": 0} | null}}}

``input`` is the layer input's learned grid (QKD): ``scale · q`` with ``q`` in ``[0, 2^b − 1]``
(unsigned) or ``[−2^(b−1), 2^(b−1) − 1]``; null means the exporter calibrates the input (PSG).
Scales are written as the float32 values the method used (JSON doubles hold them exactly).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from asc.errors import AscError
from asc.io import atomic_write_text

GRID_NAME = "quant_grid.json"
GRID_FORMAT = 1


@dataclass(frozen=True)
class InputGrid:
    """A layer input's fixed grid: ``scale · (q − zero_point)``, q unsigned or signed ``bits``-bit."""

    scale: float
    signed: bool
    bits: int
    zero_point: int = 0

    @property
    def bounds(self) -> tuple[int, int]:
        if self.signed:
            return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        return 0, 2**self.bits - 1


@dataclass(frozen=True)
class LayerGrid:
    """One conv/linear layer's weight grid (per output channel) and, optionally, its input grid."""

    bits: int
    weight_scale: tuple[float, ...]
    input: InputGrid | None = None

    @property
    def levels(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def scales(self, weight: Tensor) -> Tensor:
        """The per-channel scales shaped to broadcast over ``weight`` (dim 0: output channels)."""
        return torch.tensor(self.weight_scale, dtype=weight.dtype).reshape(-1, *([1] * (weight.dim() - 1)))

    def integers(self, weight: Tensor) -> Tensor:
        """The whole ``k`` of ``weight`` on this grid: ``round(clip(w / s, −L, L))``."""
        return torch.round(torch.clamp(weight / self.scales(weight), -self.levels, self.levels))


@dataclass(frozen=True)
class QuantGrid:
    """Every quantized layer's grid, by module name of the float twin."""

    method: str
    layers: dict[str, LayerGrid]

    def to_dict(self) -> dict[str, Any]:
        return {"format": GRID_FORMAT, "method": self.method, "layers": {
            name: {"bits": layer.bits, "weight_scale": list(layer.weight_scale),
                   "input": None if layer.input is None else
                   {"scale": layer.input.scale, "signed": layer.input.signed, "bits": layer.input.bits,
                    "zero_point": layer.input.zero_point}}
            for name, layer in self.layers.items()}}

    def save(self, run_dir: Path) -> Path:
        path = Path(run_dir) / GRID_NAME
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def read(cls, run_dir: Path) -> QuantGrid | None:
        """The grid of a compressed run folder, or None when its methods left none."""
        path = Path(run_dir) / GRID_NAME
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            if data.get("format") != GRID_FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {GRID_FORMAT}")
            layers = {name: LayerGrid(int(entry["bits"]), tuple(float(s) for s in entry["weight_scale"]),
                                      None if entry["input"] is None else
                                      InputGrid(float(entry["input"]["scale"]), bool(entry["input"]["signed"]),
                                                int(entry["input"]["bits"]), int(entry["input"]["zero_point"])))
                      for name, entry in data["layers"].items()}
        except (ValueError, KeyError, TypeError) as error:
            raise AscError(f"{path}: not a readable quantization grid ({error}); re-run `asc compress`") from None
        return cls(str(data["method"]), layers)


def per_channel(scale: Tensor, channels: int) -> tuple[float, ...]:
    """A scale tensor (one per channel, or one for the tensor) as ``channels`` Python floats."""
    flat = scale.detach().float().cpu().flatten()
    return tuple(float(s) for s in (flat.expand(channels) if flat.numel() == 1 else flat))
