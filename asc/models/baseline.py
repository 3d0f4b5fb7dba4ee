"""The DCASE 2021 Task 1A baseline CNN, the reference point every submission is compared with.

A port of the organisers' Keras model (input 1 x 40 x 500 log-mel, 46,246 parameters counted
the Keras way). Keras defaults are kept where they change the numbers: "same" padding, floor
pooling, and BatchNorm with eps 1e-3 and momentum 0.99 (PyTorch momentum 0.01).

Other input sizes: the second pooling always produces 2 x 1 (see :class:`TwoBandMaxPool`), so the
dense layer sees 32 * 2 features whatever the input and the parameter count does not change.
For 40 x 500 (8 x 100 after the first 5x5 pool) that is exactly the original 4 x 100 pool.
Inputs need at least 10 frequency bins and 5 frames.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 7, padding=3),
        nn.BatchNorm2d(out_channels, eps=1e-3, momentum=0.01),
        nn.ReLU(),
    )


class TwoBandMaxPool(nn.Module):
    """Max over the whole time axis and over each half of the frequency axis -> (N, C, 2, 1).

    An odd last frequency row is dropped, as floor pooling does. Written with a reshape and
    reductions instead of ``AdaptiveMaxPool2d``, which does not export to ONNX when the
    frequency size is odd.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[2] // 2
        bands = x[:, :, : 2 * half].unflatten(2, (2, half))  # (N, C, 2, F/2, T)
        return bands.amax(dim=(3, 4)).unsqueeze(3)


class DCASE2021Baseline(nn.Module):
    """Three 7x7 conv layers, two max-pools and a 100-unit dense layer; logits (no softmax)."""

    def __init__(self, num_classes: int = 10, *, dropout: float = 0.3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn_relu(1, 16),
            _conv_bn_relu(16, 16),
            nn.MaxPool2d(5),
            nn.Dropout(dropout),
            _conv_bn_relu(16, 32),
            TwoBandMaxPool(),
            nn.Dropout(dropout),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 2, 100),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(100, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def keras_param_count(model: nn.Module) -> int:
    """Parameters as Keras reports them: all weights plus BatchNorm moving mean and variance.

    Used to check the port against the published 46,246 and to compare with DCASE tables,
    which quote Keras counts for the baseline.
    """
    weights = sum(p.numel() for p in model.parameters())
    running_stats = sum(
        m.running_mean.numel() + m.running_var.numel()
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    )
    return weights + running_stats
