"""BC-ResNet (keyword spotting original) and BC-ResNet-Mod (DCASE 2021 acoustic scenes).

Both take log-mels shaped (batch, 1, frequency, time) and return logits (batch, classes).
The broadcasted residual block does most of its work on one frequency-pooled row (cheap 1-D
convs) and broadcasts the result back over frequency, so a small model still sees the whole
spectrum. Forward passes have no data-dependent control flow, so the models export to ONNX.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeAlias

import torch
from torch import nn

from asc.errors import ConfigError
from asc.models import norms
from asc.models.norms import NormFactory

ActFactory: TypeAlias = Callable[[], nn.Module]
IntPair: TypeAlias = int | tuple[int, int]


def conv_norm_act(
    in_channels: int,
    out_channels: int,
    kernel_size: IntPair,
    *,
    norm: NormFactory,
    act: ActFactory | None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
) -> nn.Sequential:
    """Bias-free conv followed by a norm (which supplies the bias) and an optional activation."""
    layers = [
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=False),
        norm(out_channels),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class BCResBlock(nn.Module):
    """Broadcasted residual block: ``ReLU(shortcut + f2(x) + broadcast(f1(mean_F f2(x))))``.

    A block that changes the width is a transition block: it starts with a 1x1 conv and has no
    identity shortcut. Only transition blocks may stride over frequency.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        subband_norm: NormFactory,
        activation: ActFactory = nn.SiLU,
        freq_stride: int = 1,
        time_dilation: int = 1,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.identity_shortcut = in_channels == out_channels
        if self.identity_shortcut and freq_stride != 1:
            raise ConfigError("BCResBlock: a frequency stride needs a transition block (in != out channels)")
        c = out_channels
        self.transition = (
            nn.Identity()
            if self.identity_shortcut
            else conv_norm_act(in_channels, c, 1, norm=nn.BatchNorm2d, act=nn.ReLU)
        )
        self.freq_conv = conv_norm_act(
            c, c, (3, 1), norm=subband_norm, act=None, stride=(freq_stride, 1), padding=(1, 0), groups=c
        )
        self.time_conv = conv_norm_act(
            c,
            c,
            (1, 3),
            norm=nn.BatchNorm2d,
            act=activation,
            padding=(0, time_dilation),
            dilation=(1, time_dilation),
            groups=c,
        )
        self.pointwise = nn.Conv2d(c, c, 1, bias=False)
        self.dropout = nn.Dropout2d(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.transition(x)
        z = self.freq_conv(x)  # 2-D part: depthwise frequency conv + sub-spectral norm
        row = z.mean(dim=2, keepdim=True)  # frequency average pooling -> (N, C, 1, T)
        u = self.dropout(self.pointwise(self.time_conv(row)))  # 1-D part on the pooled row
        y = z + u  # broadcast over frequency
        if self.identity_shortcut:
            y = y + shortcut
        return torch.relu(y)


def _check_width(width: float, base: int) -> None:
    if width <= 0 or int(base * width) < 1:
        raise ConfigError(f"model.args.width={width} must give at least one channel")


class BCResNet(nn.Module):
    """BC-ResNet-τ for keyword spotting (Kim et al. 2021), base width ``b = int(8τ)``.

    Designed for 1 x 40 x 101 inputs; others work if every stage's frequency size divides by
    ``sub_bands`` and the last one is at least 5 (the classifier's unpadded 5x5 conv).
    12 classes: 9,232 parameters at τ=1, 321,068 at τ=8.
    """

    BLOCKS = (2, 2, 4, 4)
    STRIDED_STAGES = (1, 2)

    def __init__(self, width: float = 1.0, num_classes: int = 12, *, sub_bands: int = 5, dropout: float = 0.1) -> None:
        super().__init__()
        _check_width(width, 8)
        b = int(8 * width)
        channels = [2 * b, b, int(1.5 * b), 2 * b, int(2.5 * b)]
        ssn = norms.norm_factory("ssn", sub_bands=sub_bands)
        self.head = conv_norm_act(1, channels[0], 5, norm=nn.BatchNorm2d, act=nn.ReLU, stride=(2, 1), padding=2)
        blocks: list[nn.Module] = []
        for stage, n_blocks in enumerate(self.BLOCKS):
            for i in range(n_blocks):
                first = i == 0
                blocks.append(
                    BCResBlock(
                        channels[stage] if first else channels[stage + 1],
                        channels[stage + 1],
                        subband_norm=ssn,
                        freq_stride=2 if first and stage in self.STRIDED_STAGES else 1,
                        time_dilation=2**stage,
                        dropout=dropout,
                    )
                )
        self.blocks = nn.Sequential(*blocks)
        c = channels[-1]
        self.classifier = nn.Sequential(
            nn.Conv2d(c, c, 5, padding=(0, 2), groups=c, bias=False),
            conv_norm_act(c, 4 * b, 1, norm=nn.BatchNorm2d, act=nn.ReLU),
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(4 * b, num_classes, 1),
            nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.blocks(self.head(x)))

    def feature_taps(self) -> dict[str, nn.Module]:
        """Named stages whose outputs methods may read (methods.md §1.3 numbering: stage0-3)."""
        ends = [sum(self.BLOCKS[: stage + 1]) - 1 for stage in range(len(self.BLOCKS))]
        return {"head": self.head, **{f"stage{stage}": self.blocks[end] for stage, end in enumerate(ends)}}


class BCResNetMod(nn.Module):
    """BC-ResNet-Mod / BC-ResNet-ASC (DCASE 2021 Task 1A winner), width ``c``.

    Changes from BC-ResNet that suit 10-s scenes: a frequency-wise norm on the input and after
    each stage (removes per-clip device colouring), no dilation and no strided blocks (down-sampling
    only by the stride-2 head and two 2x2 max-pools, which limits the receptive field), and a
    1x1 conv + global average pooling classifier. Any input size works if the frequency size
    after the head and each pool divides by ``sub_bands`` (e.g. 256 or 128 mels with S = 4).
    10 classes, S = 4: 8,055 parameters at c=10, 85,890 at c=40, 314,970 at c=80 (the DCASE system).

    ``freq_norm`` picks the frequency-wise norm (see :func:`asc.models.norms.freq_norm`),
    ``freq_norm_lambda`` its shortcut weight, ``block_norm`` the norm after the blocks'
    frequency convs ("ssn" or "bn").
    """

    BLOCKS = (2, 2, 2, 3)
    POOLED_STAGES = (0, 1)

    def __init__(
        self,
        width: int = 40,
        num_classes: int = 10,
        *,
        sub_bands: int = 4,
        freq_norm: str = "resnorm",
        freq_norm_lambda: float | None = None,
        block_norm: str = "ssn",
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        _check_width(width, 1)
        if int(width) != width:
            raise ConfigError(f"BC-ResNet-Mod width must be a whole number of channels, got {width}")
        width = int(width)
        channels = [2 * width, width, int(1.5 * width), 2 * width, int(2.5 * width)]
        subband_norm = norms.norm_factory(block_norm, sub_bands=sub_bands)
        self.input_norm = norms.freq_norm(freq_norm, 1, lam=freq_norm_lambda)
        self.head = conv_norm_act(1, channels[0], 5, norm=nn.BatchNorm2d, act=nn.ReLU, stride=2, padding=2)
        stages: list[nn.Module] = []
        for stage, n_blocks in enumerate(self.BLOCKS):
            c_in, c_out = channels[stage], channels[stage + 1]
            layers = [
                BCResBlock(c_in if i == 0 else c_out, c_out, subband_norm=subband_norm, dropout=dropout)
                for i in range(n_blocks)
            ]
            layers.append(norms.freq_norm(freq_norm, c_out, lam=freq_norm_lambda))
            if stage in self.POOLED_STAGES:
                layers.append(nn.MaxPool2d(2))
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.classifier = nn.Conv2d(channels[-1], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_norm(x)
        x = self.head(x)
        x = self.stages(x)
        return self.classifier(x).mean(dim=(2, 3))

    def feature_taps(self) -> dict[str, nn.Module]:
        """Named stages whose outputs methods may read (methods.md §2.2 numbering: stage1-4, after pooling)."""
        return {"input_norm": self.input_norm, "head": self.head,
                **{f"stage{index + 1}": stage for index, stage in enumerate(self.stages)}}

