"""CP-Mobile, as simplified for the official DCASE 2024 (and 2025) Task 1 baseline.

CP-Mobile (Schmid et al., DCASE 2023 workshop) is a receptive-field-regularised CNN of
inverted-bottleneck blocks. The organisers' baseline (CPJKU/dcase2024_task1_baseline,
``models/baseline.py``; defaults from ``run_training.py``) keeps only its skeleton:

* an in-stem of two 3x3 convs with stride 2 (1 -> C/4 -> C channels, C = ``base_channels``);
* stages of blocks ``ReLU(project(depthwise(expand(x))) + shortcut(x))``: a 1x1 expansion conv,
  a 3x3 depthwise conv (carrying the block's stride) and a 1x1 projection conv, each followed by
  a norm, the first two by the activation. The shortcut is the identity when the width is kept,
  a 3x3 average pool with the block's stride when the width is kept but the block strides, and
  absent when the width changes. The activation after the sum is applied in every block;
* a 1x1 conv to the classes, a norm and global average pooling (no dense layer).

Stage widths are ``make_divisible(C * channels_multiplier ** s, 8)`` and expansion widths
``make_divisible(c_in * expansion_rate, 8)``. Convs have no bias (the norm supplies it), so
every BatchNorm folds into its conv at deployment.

Defaults are the published system: C=32, multiplier 1.8, expansion 2.1, blocks (3, 2, 1), so
widths 32 / 56 / 104 and expansions 64 / 120. Block 3 strides time by 2 and block 4 frequency
by 2. Input is a log-mel of 256 bins x 65 frames for 1 s (32 kHz, n_fft 4096, window 3072,
hop 500). Counted as the organisers count (torchinfo via NeSsi): 61,148 parameters and
29,419,156 MACs; see :data:`PUBLISHED_PARAMS` for how ``asc.complexity`` differs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from asc.errors import ConfigError
from asc.models import norms
from asc.models.bcresnet import ActFactory, conv_norm_act
from asc.models.norms import NormFactory

PUBLISHED_PARAMS = 61_148
"""The README's count: torchinfo ``total_params`` = conv weights + BatchNorm scale and shift
(2C per norm). ``asc.complexity`` reports the same number as ``trained_params``; its deployed
count folds each BatchNorm into the conv before it (C biases instead of 2C affine values), so it
is smaller by the sum of the normalised channels, 1,354 for the default model: 59,794."""

PUBLISHED_MACS = 29_419_156
"""The README's MACs on a 1 x 1 x 256 x 65 input: torchinfo ``total_mult_adds`` = conv MACs plus
2C per BatchNorm (its parameter count, not per position). ``asc.complexity`` counts convs only,
so it gives 2 x 1,354 = 2,708 fewer: 29,416,448."""

Stride = tuple[int, int]
DEFAULT_STRIDES: dict[int, Stride] = {3: (1, 2), 4: (2, 1)}
"""Strides (frequency, time) by block number, counted from 1 over the whole network."""


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` (at least ``divisor``), never more
    than 10 % below ``value`` (the MobileNet channel rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class CPMobileBlock(nn.Module):
    """Inverted bottleneck: 1x1 expand -> 3x3 depthwise (strided) -> 1x1 project, plus shortcut."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        expansion_rate: float,
        stride: Stride = (1, 1),
        norm: NormFactory = nn.BatchNorm2d,
        activation: ActFactory = nn.ReLU,
    ) -> None:
        super().__init__()
        hidden = make_divisible(in_channels * expansion_rate)
        self.expand = conv_norm_act(in_channels, hidden, 1, norm=norm, act=activation)
        self.depthwise = conv_norm_act(hidden, hidden, 3, norm=norm, act=activation, stride=stride,
                                       padding=1, groups=hidden)
        self.project = conv_norm_act(hidden, out_channels, 1, norm=norm, act=None)
        self.shortcut: nn.Module | None
        if in_channels != out_channels:
            self.shortcut = None
        elif tuple(stride) == (1, 1):
            self.shortcut = nn.Identity()
        else:
            self.shortcut = nn.AvgPool2d(3, stride=stride, padding=1)
        self.activation = activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        if self.shortcut is not None:
            y = y + self.shortcut(x)
        return self.activation(y)


class CPMobile(nn.Module):
    """The DCASE 2024/2025 Task 1 baseline (simplified CP-Mobile); logits (batch, classes).

    ``strides`` maps block numbers (1-based, over all stages) to (frequency, time) strides of
    their depthwise conv; other blocks keep the resolution. ``norm`` (a factory, or a name for
    :func:`asc.models.norms.norm_factory`) and ``activation`` (a factory) are BatchNorm and ReLU in
    the published system.
    """

    def __init__(
        self,
        num_classes: int = 10,
        *,
        in_channels: int = 1,
        base_channels: int = 32,
        channels_multiplier: float = 1.8,
        expansion_rate: float = 2.1,
        n_blocks: Sequence[int] = (3, 2, 1),
        strides: Mapping[int, Sequence[int]] | None = None,
        norm: str | NormFactory = "bn",
        activation: ActFactory = nn.ReLU,
    ) -> None:
        super().__init__()
        norm = norms.norm_factory(norm) if isinstance(norm, str) else norm
        if not callable(norm) or not callable(activation):
            raise ConfigError("CP-Mobile: norm must be a norm name or factory, activation a module factory")
        if base_channels < 1 or channels_multiplier <= 0 or expansion_rate <= 0:
            raise ConfigError("CP-Mobile: base_channels, channels_multiplier and expansion_rate must be positive")
        if not n_blocks or min(n_blocks) < 1:
            raise ConfigError(f"CP-Mobile: n_blocks needs at least one block per stage, got {tuple(n_blocks)}")
        strides = DEFAULT_STRIDES if strides is None else strides
        total = sum(n_blocks)
        block_strides = {int(k): tuple(int(s) for s in v) for k, v in strides.items()}
        bad = [k for k, v in block_strides.items() if not 1 <= k <= total or len(v) != 2 or min(v) < 1]
        if bad:
            raise ConfigError(f"CP-Mobile: stride for block {bad[0]} is invalid; blocks are 1..{total} and "
                              "strides (frequency, time) pairs of positive integers")
        base = make_divisible(base_channels)
        widths = [base] + [make_divisible(base * channels_multiplier**s) for s in range(len(n_blocks))]

        self.stem = nn.Sequential(
            conv_norm_act(in_channels, base // 4, 3, norm=norm, act=activation, stride=2, padding=1),
            conv_norm_act(base // 4, base, 3, norm=norm, act=activation, stride=2, padding=1),
        )
        stages: list[nn.Module] = []
        block_number = 0
        for stage, count in enumerate(n_blocks):
            blocks: list[nn.Module] = []
            for i in range(count):
                block_number += 1
                blocks.append(CPMobileBlock(
                    widths[stage] if i == 0 else widths[stage + 1], widths[stage + 1],
                    expansion_rate=expansion_rate, stride=block_strides.get(block_number, (1, 1)),
                    norm=norm, activation=activation))
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.classifier = conv_norm_act(widths[-1], num_classes, 1, norm=norm, act=None)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.stages(x)
        return self.classifier(x).mean(dim=(2, 3))  # global average pooling of the class maps

    def feature_taps(self) -> dict[str, nn.Module]:
        """Named stages whose outputs methods may read: the stem and stage1..stageN."""
        return {"stem": self.stem, **{f"stage{i + 1}": stage for i, stage in enumerate(self.stages)}}


def _init_weights(module: nn.Module) -> None:
    """The baseline's initialisation: Kaiming-normal (fan-out) convs, unit-scale zero-shift norms."""
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
